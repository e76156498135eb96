"""The ingress's front door: an ASGI middleware that runs before FastAPI parses anything.

Per request, in order: docs and admin routes hidden unless switched on; API keys on `/v1` and
the admin key on `/admin` (OpenAI's 401 body); 503 + Retry-After once shutdown has begun, or while
`max_in_flight` requests are being answered (the cheapest refusal there is: no body read, nothing
parsed, so it stays quick when the ingress gets little CPU); the body read with a byte budget (413 on the Content-Length alone, or as soon as a chunked body
passes the budget: a 50 MB body is never parsed); one log line with id, sizes and timings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from deployments.auth import bearer_token, key_accepted
from deployments.protocol import error_body

logger = logging.getLogger("ray.serve.helios.access")  # under Serve's logger: into the replica's log
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
LOGGED_TEXT_LIMIT = 64 << 10  # with log_prompts on, at most this much of each body goes to the log
GONE = (0, {}, {})  # _read_body's answer when the client disconnected mid-body


@dataclass
class GuardSettings:
    """What the guard enforces; the ingress fills it from the serving config."""

    max_body_bytes: int = 4 << 20
    api_keys: frozenset[str] = frozenset()
    admin_key: str | None = None  # None: /admin is off (404)
    docs: bool = False
    log_prompts: bool = False
    retry_after_s: int = 1
    draining: bool = False  # set when shutdown begins: new /v1 requests get 503
    in_flight: int = 0  # HTTP requests being answered now
    max_in_flight: int | None = None  # beyond this many, /v1 requests get 503 + Retry-After; None: no bound
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class Guard:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings: GuardSettings = scope["app"].state.guard
        request_id = uuid.uuid4().hex[:16]
        start = time.monotonic()
        sent = {"status": 0, "bytes": 0, "text": []}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
                if settings.log_prompts and sent["bytes"] <= LOGGED_TEXT_LIMIT:
                    sent["text"].append(message.get("body", b""))
            await send(message)

        settings.in_flight += 1
        settings.idle.clear()
        body = b""
        try:
            refusal = _refusal(scope, settings)
            if refusal is None:
                body, refusal = await _read_body(scope, receive, settings.max_body_bytes)
            if refusal is GONE:  # the client left while sending: nobody to answer
                return
            if refusal is not None:
                return await _respond(send_counted, *refusal)
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            settings.in_flight -= 1
            if settings.in_flight == 0:
                settings.idle.set()
            _log(scope, request_id, len(body), sent, time.monotonic() - start, settings.log_prompts, body)


def _refusal(scope, settings: GuardSettings) -> tuple[int, dict, dict] | None:
    """(status, error body, headers) for a request refused on its path and headers alone."""
    path = scope["path"]
    if path.startswith(scope.get("root_path") or "\0"):  # an app under a route prefix: routes are relative
        path = path[len(scope["root_path"]):]
    if path in DOCS_PATHS and not settings.docs:
        return 404, error_body("not found (API docs are off: ingress.docs)", "not_found_error"), {}
    if path == "/admin" or path.startswith("/admin/"):
        if settings.admin_key is None:
            return 404, error_body("not found", "not_found_error"), {}
        if not key_accepted(bearer_token(scope["headers"]), frozenset([settings.admin_key])):
            return 401, error_body("the admin routes need the admin key as a bearer token",
                                   code="invalid_api_key"), {}
    if path.startswith("/v1/") or path == "/v1":
        if settings.api_keys and not key_accepted(bearer_token(scope["headers"]), settings.api_keys):
            return 401, error_body("Incorrect or missing API key: send it as `Authorization: Bearer KEY`",
                                   code="invalid_api_key"), {}
        if settings.draining:
            return 503, error_body("the server is shutting down", "server_error", "shutting_down"), \
                {"retry-after": str(settings.retry_after_s)}
        if settings.max_in_flight is not None and settings.in_flight > settings.max_in_flight:  # this one counted
            return 503, error_body(f"the server is answering its limit of {settings.max_in_flight} requests "
                                   f"(ingress.max_in_flight); retry later", "server_error", "queue_full"), \
                {"retry-after": str(settings.retry_after_s)}
    return None


async def _read_body(scope, receive, limit: int) -> tuple[bytes, tuple | None]:
    """The whole body, or a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = (413, error_body(f"the request body exceeds this server's limit of {limit} bytes "
                                 f"(limits.max_body_bytes)"), {"connection": "close"})
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return b"", too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", GONE
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive):
    """An ASGI receive that hands the app the body already read, then waits on the client as before
    (so a disconnect still reaches the app)."""
    delivered = False

    async def replayed():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _respond(send, status: int, payload: dict, headers: dict) -> None:
    content = json.dumps(payload).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": content})


def _log(scope, request_id: str, request_bytes: int, sent: dict, seconds: float, with_text: bool,
         body: bytes) -> None:
    line = (f"request {request_id} {scope['method']} {scope['path']} status={sent['status']} "
            f"in={request_bytes}B out={sent['bytes']}B time={seconds * 1000:.1f}ms")
    if with_text:  # only when the config asks: prompts and outputs are the users' data
        line += (f" body={body[:LOGGED_TEXT_LIMIT].decode('utf-8', 'replace')!r}"
                 f" response={b''.join(sent['text']).decode('utf-8', 'replace')!r}")
    logger.info(line)
