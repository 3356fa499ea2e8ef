"""What every route shares: the proxy's state (config, model, backend, metrics, admission)
and reading, authorising and parsing a request body."""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import Request

from qwenvl_pd.proxy.config import ProxyConfig
from qwenvl_pd.proxy.errors import bad_request, not_found_model, overloaded, unauthorized
from qwenvl_pd.proxy.cluster.interface import Backend
from qwenvl_pd.proxy.prompt.media import read_capped
from qwenvl_pd.proxy.metrics import ProxyMetrics
from qwenvl_pd.proxy.prompt.model_info import ProxyModel
from qwenvl_pd.proxy.prompt.workers import off_loop


@dataclass
class Slot:
    """One admitted request of `weight` samples; release() is idempotent, so every exit path
    may call it."""
    proxy: "Proxy"
    weight: int = 1
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.proxy.active -= self.weight


@dataclass
class Proxy:
    cfg: ProxyConfig
    model: ProxyModel
    backend: Backend
    metrics: ProxyMetrics
    active: int = 0
    _keys: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self):
        self._keys = tuple(k.encode() for k in self.cfg.api_keys)

    def authorize(self, request: Request) -> bytes:
        """The caller's API key (b"" when none is configured); 401 unless it is one of ours."""
        if not self._keys:
            return b""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip().encode()
        # every key compared, so the time taken does not tell which one nearly matched
        matches = [k for k in self._keys if hmac.compare_digest(sent, k)]
        if scheme.lower() != "bearer" or not matches:
            raise unauthorized()
        return matches[0]

    def cache_salt(self, key: bytes, salt: str) -> str:
        """The salt a request's prefix-cache hashes start from: the client's own cache_salt, under
        its API key's when --cache-salt-per-api-key keeps tenants apart."""
        if not (self.cfg.cache_salt_per_api_key and key):
            return salt
        return hashlib.sha256(b"qwenvl-pd api key\0" + key).hexdigest()[:32] + ":" + salt

    def check_model(self, name: str | None) -> None:
        if name is not None and not self.model.answers_to(name):
            raise not_found_model(name)

    def admit(self, n: int = 1) -> Slot:
        """A request of n samples takes n places: each is its own prefill and decode."""
        bound = self.cfg.max_concurrent_requests
        if n > bound:
            raise bad_request(f"n ({n}) is more than this server runs at once "
                              f"(--max-concurrent-requests {bound})", "n")
        # a bound, not a queue: past it the client hears 429 at once and may retry elsewhere
        if self.active + n > bound:
            raise overloaded(f"{self.active} samples are in progress (--max-concurrent-requests "
                             f"{bound}); retry later")
        self.active += n
        return Slot(self, n)

    async def admit_and_prepare(self, prepare: Callable[[], Awaitable], n: int = 1) -> tuple[Slot, object]:
        """Admit n samples, then await prepare() (media fetches count against the bound); the
        slot is released if preparing fails."""
        slot = self.admit(n)
        try:
            return slot, await prepare()
        except BaseException:
            slot.release()
            raise


def proxy_of(request: Request) -> Proxy:
    return request.app.state.proxy


async def read_json(request: Request, limit: int):
    """The body as JSON, whatever the Content-Type says (curl -d sends a form type)."""
    buf = await read_capped(request.stream(), request.headers.get("content-length", ""), limit,
                            lambda m: bad_request(f"the request body is {m}"))
    try:
        return json.loads(buf)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}{_culprit(e)}") from None
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets: no request of the API nests so deep
        raise bad_request("the request body nests JSON too deeply") from None


async def accept(request: Request, parse):
    """Authorize, parse the body with parse() and check the model: (proxy, parsed request)."""
    p = proxy_of(request)
    key = p.authorize(request)
    # parsing validates every field and compiles grammars: proportional to the body, off the loop
    req = await off_loop(parse, await read_json(request, p.cfg.max_body_bytes))
    p.check_model(req.model)
    return p, dataclasses.replace(req, cache_salt=p.cache_salt(key, req.cache_salt))


def _culprit(e: json.JSONDecodeError) -> str:
    # guides written with a Chinese input method carry full-width commas and colons into JSON
    ch = e.doc[e.pos:e.pos + 1]
    if not ch or ch.isascii():
        return ""
    return f"; found {unicodedata.name(ch, repr(ch))} {ch!r} there, JSON needs ASCII punctuation"
