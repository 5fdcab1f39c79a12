"""Workarounds for two BentoML 1.4 server bugs that the service would otherwise suffer under load,
and the one hook BentoML lacks (3).

1. Requests kept alive for the whole timeout.

``bentoml._internal.server.http.traffic.TimeoutMiddleware`` (BentoML 1.4.x) arms a
``loop.call_later(timeout, ...)`` timer for every request and never cancels it. The timer keeps a
copy of the request's context variables (the request, its OpenTelemetry span, ...) alive until it
fires: with the service's 120 s timeout, every request's objects stay in memory for two minutes
(measured: about 14 KB per request in the HTTP process and 6 KB in the runner; at 350 requests/s the
servers grew by 100 MB per 15 s of load before levelling off near rate x timeout).

:func:`apply` replaces the middleware's ``__call__`` with the same logic plus ``timer.cancel()``
when the request is done. It is applied on import of :mod:`service.service` (so in every server
process) and only if the class still looks like the 1.4 one; otherwise it does nothing.

2. A latency trap after a burst.
The adaptive batching dispatcher (``bentoml._internal.marshal.dispatcher``) holds a lone request back
until it has waited about as long as the average wait of the last 50 batches (``Optimizer.wait``,
times 0.95), hoping that more requests arrive. Under saturation that average is queueing time behind
the busy model (hundreds of ms), and afterwards every request is held that long, so the average
never comes down: measured on the 2-core machine, a single client's 32-image requests took 34 ms
before a burst at concurrency 32 and 270-380 ms after it, still 355 ms ten seconds later.
:func:`cap_batching_wait` caps the learned wait (``NAD_GUARD_BATCH_WAIT_MS``). Requests that arrive
while the model is busy are still merged: they queue until it is free, whatever the cap.

3. No outermost middleware.
A service's own ASGI middleware (``add_asgi_middleware``) runs inside BentoML's: its per-path
metrics, OpenTelemetry, access log and request timeout see every request first, and the metrics
make a label of every path, served or not. :func:`wrap_asgi` wraps the app that
``Service.to_asgi`` builds (what ``bentoml serve`` workers run) so that a middleware of the service
runs before all of them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

_OUTER: dict[Any, Callable[[Any], Any]] = {}  # service class -> wrapper of its ASGI app (wrap_asgi)


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


def cap_batching_wait(seconds: float) -> bool:
    """Cap BentoML's learned batching wait (``Optimizer.wait``) at ``seconds`` in this process, for
    every dispatcher; returns whether it was patched. Calling it again changes the cap."""
    try:
        from bentoml._internal.marshal.dispatcher import Optimizer
    except ImportError:  # pragma: no cover - another BentoML layout
        return False
    if not hasattr(Optimizer, "trigger_refresh") or seconds < 0:
        return False
    original = getattr(Optimizer.trigger_refresh, "__nad_guard_original__", Optimizer.trigger_refresh)

    def trigger_refresh(self: Any) -> None:
        original(self)
        self.wait = min(self.wait, seconds)

    trigger_refresh.__nad_guard_original__ = original  # type: ignore[attr-defined]
    Optimizer.trigger_refresh = trigger_refresh
    return True


def wrap_asgi(service: Any, wrapper: Callable[[Any], Any]) -> bool:
    """Make ``wrapper(app)`` the ASGI app served for ``service`` (a ``bentoml.service``), where ``app``
    is the one BentoML builds, its middleware included; returns whether it was hooked (idempotent:
    the last wrapper given for a service is used)."""
    cls = type(service)
    if not hasattr(cls, "to_asgi") or not hasattr(service, "inner"):  # pragma: no cover - another layout
        return False
    _OUTER[service.inner] = wrapper
    if getattr(cls.to_asgi, "__nad_guard_fixed__", False):
        return True
    original = cls.to_asgi

    def to_asgi(self: Any, *args: Any, **kwargs: Any) -> Any:
        app = original(self, *args, **kwargs)
        outer = _OUTER.get(getattr(self, "inner", None))
        return outer(app) if outer is not None else app

    to_asgi.__nad_guard_fixed__ = True  # type: ignore[attr-defined]
    cls.to_asgi = to_asgi
    return True
