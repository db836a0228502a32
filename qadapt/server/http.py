"""HTTP plumbing shared by the routes: error statuses and bodies (OpenAI's and LoRAX's shapes), server-sent
events, bounded JSON bodies, the error-catching route wrapper and the API-key middleware."""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..adapters.sources import EndpointUnreachableError
from ..errors import InputError, QadaptError, SourceError
from .registry import Busy, Forbidden, NotFound, Unavailable

log = logging.getLogger("qadapt.server.app")


class TooLarge(QadaptError):
    """A request body above the server's limit (HTTP 413)."""


class Failed(Exception):
    """The engine failed a request (its status and message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


#: error class -> HTTP status, most specific first; anything else is a bug (500)
_STATUS = ((NotFound, 404), (Forbidden, 403), (Busy, 429), (Unavailable, 503), (TooLarge, 413),
           (EndpointUnreachableError, 502), (SourceError, 404), (QadaptError, 400))


def status_of(e: BaseException) -> int:
    if isinstance(e, Failed):
        return e.status
    return next((status for cls, status in _STATUS if isinstance(e, cls)), 500)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 502: "upstream_error",
          503: "unavailable_error"}
#: LoRAX's error_type values (its client maps them to exception classes)
_LORAX_TYPES = {400: "validation", 422: "validation", 429: "overloaded", 503: "overloaded"}


def error_body(status: int, message: str, lorax: bool = False) -> dict[str, Any]:
    if lorax:
        return {"error": message, "error_type": _LORAX_TYPES.get(status, "generation" if status >= 500 else
                                                                  _TYPES.get(status, "generation"))}
    return {"error": {"message": message, "type": _TYPES.get(status, "internal_error"), "param": None,
                      "code": status}}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Gone(Exception):
    """The client of a non-streamed request disconnected."""


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None  # not Linux


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused unread
        raise TooLarge(f"the request body has {int(declared)} bytes, above the limit of {limit} (--max-body-bytes)")
    chunks, size = [], 0  # no (or a false) Content-Length: count while reading
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is above the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"malformed JSON in the request body: {e}") from None


def route(server: Any, fn, lorax: bool = False):
    """Turn exceptions into JSON error bodies with their status; only bugs give 500 (and are logged)."""

    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except Gone:  # nobody reads this response
            return Response(status_code=499)
        except Exception as e:
            status = status_of(e)
            if lorax and status == 400:
                status = 422  # LoRAX's and TGI's routers answer validation errors with 422
            if status == 500:
                log.exception("%s %s failed", request.method, request.url.path)
                message = f"internal error ({type(e).__name__}); see the server log"
            else:
                message = str(e)
                log.info("%s %s -> %d: %s", request.method, request.url.path, status, message)
            server.metrics.http_errors[status] += 1
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            return JSONResponse(error_body(status, message, lorax), status_code=status, headers=headers)

    return handler


def key_ok(headers: dict[bytes, bytes], key: bytes) -> bool:
    """Whether request ``headers`` carry ``key`` (``Authorization: Bearer KEY`` or ``x-api-key: KEY``)."""
    given = headers.get(b"x-api-key", b"")
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return bool(given) and hmac.compare_digest(given, key)


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` or ``x-api-key: KEY`` on every path but ``/health``; 401 otherwise."""

    def __init__(self, app, key: str, metrics: Any):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            if not key_ok(dict(scope.get("headers") or []), self.key):
                self.metrics.http_errors[401] += 1
                lorax = scope["path"].startswith("/generate") or scope["path"] == "/"
                resp = JSONResponse(error_body(401, "missing or wrong API key (send Authorization: Bearer KEY)", lorax),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
