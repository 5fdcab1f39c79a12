"""A workaround for a BentoML 1.4 server bug that the service would otherwise suffer under load.

``bentoml._internal.server.http.traffic.TimeoutMiddleware`` (BentoML 1.4.x) arms a
``loop.call_later(timeout, ...)`` timer for every request and never cancels it. The timer keeps a
copy of the request's context variables (the request, its OpenTelemetry span, ...) alive until it
fires: with the service's 120 s timeout, every request's objects stay in memory for two minutes
(measured: about 14 KB per request in the HTTP process and 6 KB in the runner; at 350 requests/s the
servers grew by 100 MB per 15 s of load before levelling off near rate x timeout).

:func:`apply` replaces the middleware's ``__call__`` with the same logic plus ``timer.cancel()``
when the request is done. It is applied on import of :mod:`service.service` (so in every server
process) and only if the class still looks like the 1.4 one; otherwise it does nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any


def apply() -> bool:
    """Patch ``TimeoutMiddleware``; returns whether it was patched (idempotent)."""
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:  # pragma: no cover - another BentoML layout
        return False
    cls = getattr(traffic, "TimeoutMiddleware", None)
    if cls is None or not hasattr(cls, "_set_timer_out"):
        return False
    if getattr(cls.__call__, "__nad_guard_fixed__", False):
        return True

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            try:
                await waiter
            except asyncio.TimeoutError:
                if fut.cancel():
                    resp = traffic.JSONResponse(
                        {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504)
                    await resp(scope, receive, send)
            else:
                await fut  # wait for the future to finish
        finally:
            timer.cancel()  # the fix: release the request's context now, not `timeout` seconds later

    __call__.__nad_guard_fixed__ = True  # type: ignore[attr-defined]
    cls.__call__ = __call__
    return True
