"""Errors the serving side raises to whoever fronts it; the proxy maps them at its edge (an
OpenAI error body), so nothing below the proxy imports it."""


class InvalidRequest(ValueError):
    """The request cannot be served as sent (a bad prompt, media or sampling); the message says
    why, for the client."""
