"""OpenAI-style API errors: one exception type the FastAPI app turns into a JSON response.

Every validation failure is a 400 (never FastAPI's 422), so clients written against the OpenAI
API see the body shape and status they expect: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "bad_request", "not_found_model", "unauthorized", "overloaded", "no_backend",
           "server_error"]


class APIError(Exception):
    """An error with an HTTP status and the OpenAI error body fields."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r})"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


def not_found_model(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model",
                    "model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect API key provided.", "invalid_request_error", None,
                    "invalid_api_key")


def overloaded(message: str = "The server is overloaded; retry later.") -> APIError:
    return APIError(429, message, "rate_limit_error", None, "overloaded")


def no_backend(role: str) -> APIError:
    # 503 tells clients and load balancers the condition is temporary (instances come and go)
    return APIError(503, f"No healthy {role} instance is available.", "service_unavailable", None,
                    "no_backend")


def server_error(message: str, code: str | None = None) -> APIError:
    return APIError(500, message, "server_error", None, code)
