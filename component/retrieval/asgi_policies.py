"""ASGI middleware that applies the search page's web policies (component.retrieval.web) to every
response of the service, and bounds what a client may send.

They wrap the FastAPI application from the outside, so they also see what FastAPI and Starlette
answer themselves (404, 405, 422, 500):

- `WebPolicy`: a request for a Host name the server does not answer is refused (403) before
  anything else runs (DNS rebinding); every response gets nosniff, a Content-Security-Policy (the
  page's own, by nonce, or none at all for everything else) and Cross-Origin-Resource-Policy.
- `BodyLimits`: a body larger than its path's limit is refused (413) from its Content-Length
  before it is read, or as soon as a chunked body passes the limit; a client that stops sending
  its body for `body_timeout` seconds gets 408 and the connection is closed, so a stalled upload
  never holds a decode slot or a thread for long.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from component.retrieval.web import host_refusal, security_headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header, or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, document: dict, close: bool = False) -> None:
    """A complete JSON response; `close` asks the server to close the connection after it."""
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class WebPolicy:
    """Refuse unknown Host names (403) and put the security headers on every response."""

    def __init__(self, app: App, allowed_hosts: frozenset[str]):
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_security_headers(list(message.get("headers", [])))
            await send(message)

        reason = host_refusal(header(scope, b"host"), self.allowed_hosts)
        if reason is not None:
            await send_json(send_with_headers, 403, {"error": reason}, close=True)
            return
        await self.app(scope, receive, send_with_headers)


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` plus the security headers; a page's own Content-Security-Policy (by nonce) stays."""
    present = {name.lower() for name, _ in headers}
    for name, value in security_headers().items():
        if name.lower().encode() not in present:
            headers.append((name.lower().encode(), value.encode()))
    if b"cache-control" not in present:
        headers.append((b"cache-control", b"no-store"))
    return headers


class BodyLimits:
    """Bound each request body in bytes (by path) and in time between its chunks.

    Args:
        limits: path -> the most bytes its body may have; `default_limit` for any other path.
        body_timeout: seconds the body may stall before the request is answered 408 and closed.
    """

    def __init__(self, app: App, limits: dict[str, int], default_limit: int, body_timeout: float):
        self.app = app
        self.limits = limits
        self.default_limit = default_limit
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await send_json(send, 413, {"error": f"the request body is over {limit} bytes"}, close=True)
            return
        await self.run(scope, receive, send, limit)

    async def run(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the application with a receive that counts and times the body."""
        state = {"received": 0, "body_done": False, "failure": None, "started": False}

        async def bounded_receive() -> Message:
            if state["failure"] is not None:
                return {"type": "http.disconnect"}
            if state["body_done"]:  # what follows is waiting for a disconnect: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                state["failure"] = (408, f"the request body stalled for {self.body_timeout:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if state["received"] > limit:
                    state["failure"] = (413, f"the request body is over {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["failure"] is not None:
                return  # the answer is ours: the application gave up on a body it did not get
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if state["failure"] is None:
                raise
        if state["failure"] is not None and not state["started"]:
            status, reason = state["failure"]
            await send_json(send, status, {"error": reason}, close=True)
