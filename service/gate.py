"""The service's HTTP gate: the outermost layer of its ASGI app, in front of all of BentoML's.

Every request passes here first (:func:`service.bentoml_fixes.wrap_asgi` puts it there), so that what a
client can make the server do before it is refused is bounded, and refused in one place:

* **routes**: a path the app does not serve is answered 404 here and counted in one series
  (``nad_guard_unknown_route_requests_total``): it never reaches BentoML's metrics, which make
  every path a label of their own (3,000 random paths took ``/metrics`` from 136 KB to 12.8 MB);
* **authentication** (when a key is set, :attr:`Settings.api_key`): ``Authorization: Bearer KEY``,
  compared in constant time, on every route but ``/healthz``, ``/livez``, ``/readyz`` and, if
  ``NAD_GUARD_METRICS_AUTH=0``, ``/metrics``; else 401;
* **the body of a prediction request**: its media type must be one the routes take (else 415), its
  size within that type's limit (:meth:`Settings.body_limits`; from Content-Length before reading,
  and while it streams in: 413), and all of it must arrive within ``NAD_GUARD_BODY_TIMEOUT_S`` (408);
  these three close the connection;
* **parsing and checks** (:mod:`service.inputs`): the body becomes the checked float32 batch that the
  endpoint receives (:data:`BATCH_KEY` in the request's scope), or a 400 saying what is wrong. Work
  that can take more than a few ms (a JSON or .npy body over ``INLINE_BYTES``, any image file) runs
  in a thread, one such request at a time per worker, so neither the event loop nor memory is held
  by more than one large body at once;
* **deep mode** (``?probes=K`` on ``/predict_with_trust``; :mod:`nad_guard.deep`): ``K`` must be 0 or the
  guard's fitted number of probes (else 400, before the body is read). A deep request costs ``K + 1``
  forward rows an image, so it may hold at most ``NAD_GUARD_MAX_BATCH // (K + 1)`` images, and its body
  limits are those of that many images: both checked before the work, like a single-pass request's. A deep
  request is then handed to BentoML under the internal route of the deep endpoint (its own batches: deep
  and single-pass requests are never merged), a route that is not served directly (404);
* **answers**: every refusal is ``[{"error": "..."}]`` (the shape BentoML gives its 4xx answers) and
  one log line at WARNING (unknown routes at INFO); server errors of the prediction routes (500, the
  503 of an overloaded batch queue, the 504 of BentoML's request timeout) are rewritten to the same
  shape with a message that says what happened; ``/docs.json`` is the service's own OpenAPI document
  (:mod:`service.openapi`), which describes all of this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import typing as t
from http import HTTPStatus
from urllib.parse import parse_qs

import anyio
import numpy as np
import prometheus_client
import pydantic_core
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.routing import Mount, Route

from nad_guard.models import InputSpec
from service.inputs import (FIELDS, USAGE, InputError, check_batch, decode_image, read_json_object, read_json_text,
                            read_npy)
from service.loader import Settings

log = logging.getLogger("nad_guard.service")

BATCH_KEY = "nad_guard.batch"  # the checked batch, in the scope of a request that passed the gate
NPY = "application/x-npy"
MEDIA_TYPES = (NPY, "application/json", "multipart/form-data", "application/x-www-form-urlencoded")
INLINE_BYTES = 256 << 10  # bodies up to this size are parsed and checked on the event loop (a few ms at most)
OPEN_PATHS = ("/healthz", "/livez", "/readyz")  # never need the key (probes)

REFUSED = prometheus_client.Counter(
    "nad_guard_refused_requests", "Prediction requests refused before the model (bad input, size, media type, "
    "timeout, authentication), by endpoint and HTTP status", ["endpoint", "status"])
UNKNOWN_ROUTES = prometheus_client.Counter(
    "nad_guard_unknown_route_requests", "Requests for paths the service does not serve (answered 404; "
    "not in BentoML's per-endpoint series)")


class Refusal(Exception):
    """A request refused with ``status`` and ``message``; ``close``: close the connection after the
    answer (the body was not read)."""

    def __init__(self, status: HTTPStatus, message: str, *, close: bool = False,
                 headers: t.Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, tuple(headers)


def error_body(message: str) -> bytes:
    return pydantic_core.to_json([{"error": message}])


async def answer(send: t.Any, status: int, message: str, *, close: bool = False,
                 headers: t.Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send ``[{"error": message}]`` with ``status`` (and ``Connection: close`` if ``close``)."""
    body = error_body(message)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": int(status), "headers": head})
    await send({"type": "http.response.body", "body": body})


def known_paths(app: t.Any) -> tuple[frozenset[str], tuple[t.Any, ...]]:
    """The paths ``app`` (a Starlette app) serves: its literal routes and the files of its static
    mounts, and the compiled patterns of routes with parameters (none in this service)."""
    exact: set[str] = set()
    patterns = []
    for route in getattr(app, "routes", ()):
        if isinstance(route, Route):
            if route.param_convertors:
                patterns.append(route.path_regex)
            else:
                exact.add(route.path)
        elif isinstance(route, Mount) and getattr(route.app, "directory", None):
            base = str(route.app.directory)
            for folder, _, files in os.walk(base):
                rel = os.path.relpath(folder, base).replace(os.sep, "/")
                prefix = route.path + ("" if rel == "." else "/" + rel)
                exact.update(f"{prefix}/{name}" for name in files)
        elif isinstance(route, Mount):  # a mounted app: everything under it is its business
            patterns.append(route.path_regex)
    return frozenset(exact), tuple(patterns)


class Gate:
    """The ASGI middleware described in the module docstring. ``predict_paths``: the prediction routes;
    ``openapi``: a function returning the OpenAPI document (``/docs.json``)."""

    def __init__(self, app: t.Any, *, settings: Settings, spec: InputSpec, predict_paths: t.Iterable[str],
                 openapi: t.Callable[[], dict], timeouts: dict[int, str] | None = None, deep_probes: int = 0,
                 deep_route: tuple[str, str] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.spec = spec
        self.limits = settings.body_limits(spec)
        self.predict_paths = frozenset(predict_paths)
        self.openapi = openapi
        self.exact, self.patterns = known_paths(app)
        self.exact |= self.predict_paths | {"/docs.json"}
        self.key_digest = hashlib.sha256(settings.api_key.encode()).digest() if settings.api_key else None
        self.open_paths = frozenset(OPEN_PATHS + (() if settings.metrics_auth else ("/metrics",)))
        self.server_errors = {500: "an unexpected error has occurred; the server log has the details",
                              503: f"the server is overloaded: the request waited more than {settings.max_latency_ms:,} "
                                   "ms (NAD_GUARD_MAX_LATENCY_MS) for the model; retry later",
                              **(timeouts or {})}
        self._heavy: anyio.CapacityLimiter | None = None
        # deep mode: (public route, internal route of the deep endpoint) and its per-request bounds
        self.deep_k, self.deep_route = (deep_probes, deep_route) if deep_route else (0, None)
        if self.deep_route:
            self.exact = self.exact - {self.deep_route[1]}  # reached only through ?probes=K
        self.deep_max = settings.max_batch // (self.deep_k + 1)
        self.deep_limits = dataclasses.replace(settings, max_batch=max(1, self.deep_max)).body_limits(spec)

    # ------------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope: t.Any, receive: t.Any, send: t.Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        try:
            if self.key_digest is not None and path not in self.open_paths and not self._authorised(scope):
                raise Refusal(HTTPStatus.UNAUTHORIZED, "this server needs an API key: send the header "
                              "'Authorization: Bearer <key>' (the key of NAD_GUARD_API_KEY on the server)",
                              headers=[(b"www-authenticate", b'Bearer realm="nad-guard"')], close=_has_body(scope))
            if path not in self.exact and not any(p.match(path) for p in self.patterns):
                UNKNOWN_ROUTES.inc()
                log.info("no such route: %s %s", method, _printable(path))
                return await answer(send, HTTPStatus.NOT_FOUND, f"no such route {_printable(path)!r}; the service "
                                    f"serves POST {', '.join(sorted(self.predict_paths))} (see /docs.json)",
                                    close=_has_body(scope))
            if path == "/docs.json" and method in ("GET", "HEAD"):
                body = pydantic_core.to_json(self.openapi())
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body if method == "GET" else b""})
            if path not in self.predict_paths:
                return await self.app(scope, receive, send)
            if method != "POST":
                raise Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST, not {method}",
                              headers=[(b"allow", b"POST")], close=_has_body(scope))
            k = self._probes(scope, path)
            scope[BATCH_KEY] = await self._batch(scope, receive, k)
            if k:  # the deep endpoint's own batches (service.service.NadGuard.predict_with_trust_deep)
                scope["path"], scope["raw_path"] = self.deep_route[1], self.deep_route[1].encode()
        except Refusal as r:
            endpoint = path.strip("/") if path in self.predict_paths else "other"
            REFUSED.labels(endpoint=endpoint, status=str(int(r.status))).inc()
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s: %d %s", method, _printable(path), client[0], r.status,
                        _printable(r.message)[:500])
            return await answer(send, r.status, r.message, close=r.close, headers=r.headers)
        except _ClientGone:
            return None
        await self.app(scope, _replay_empty(receive), self._normalise_errors(send))

    def _authorised(self, scope: t.Any) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    hashlib.sha256(token.strip()).digest(), self.key_digest)  # type: ignore[arg-type]
        return False

    def _normalise_errors(self, send: t.Any) -> t.Any:
        """``send`` with the server errors of BentoML (a JSON object, or its generic message) answered
        as the service's own: ``[{"error": ...}]`` with what happened."""
        held: dict | None = None

        async def wrapped(message: t.Any) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 500:
                held = message
                return
            if held is None:
                return await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                status = held["status"]
                keep = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-length",
                                                                                          b"content-type")]
                if status == 503:
                    keep.append((b"retry-after", b"1"))
                await answer(send, status, self.server_errors.get(status, self.server_errors[500]), headers=keep)
        return wrapped

    def _probes(self, scope: t.Any, path: str) -> int:
        """The request's ``probes`` query parameter: 0 (absent) or the guard's ``K``; else a 400, before the
        body is read."""
        values = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True).get("probes")
        if not values:
            return 0
        allowed = [0] + ([self.deep_k] if self.deep_k else [])
        deep_route = self.deep_route[0] if self.deep_route else "/predict_with_trust"
        given = values[0].strip()
        if len(values) > 1 or not given.isdigit() or int(given) not in allowed or (int(given) and path != deep_route):
            what = (f"probes is given {len(values)} times" if len(values) > 1 else
                    f"probes is an option of {deep_route} only" if path != deep_route and given.isdigit()
                    and int(given) in allowed else f"probes={_printable(given)[:20]!r} is not available")
            raise Refusal(HTTPStatus.BAD_REQUEST, f"{what}: the allowed values are "
                          f"{' or '.join(map(str, allowed))} (0: single pass"
                          + (f"; {self.deep_k}: the deep check, {self.deep_k} probes an image, at most "
                             f"{self.deep_max} images a request)" if self.deep_k else
                             "; this guard has no deep detector: fit one with nad-guard fit-detector --probes K)"),
                          close=_has_body(scope))
        k = int(given)
        if k and self.deep_max < 1:
            raise Refusal(HTTPStatus.BAD_REQUEST, f"deep mode (probes={k}) costs {k + 1} rows an image, more than "
                          f"the server's limit of {self.settings.max_batch} rows a request (NAD_GUARD_MAX_BATCH)",
                          close=_has_body(scope))
        return k

    # ------------------------------------------------------------------------------------ body
    async def _batch(self, scope: t.Any, receive: t.Any, probes: int = 0) -> np.ndarray:
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media not in MEDIA_TYPES:
            raise Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Type "
                          f"{_printable(content_type) or '(none)'!r}; {USAGE}", close=_has_body(scope))
        limits, max_batch = (self.deep_limits, self.deep_max) if probes else (self.limits, self.settings.max_batch)
        limit = limits[media]
        deep = f" in deep mode (probes={probes}: {probes + 1} rows an image)" if probes else ""
        too_large = (f"the request body is larger than the limit of {limit:,} bytes for {media}{deep} (the largest "
                     f"valid request: {max_batch} images of {self.spec.channels}x{self.spec.height}x"
                     f"{self.spec.width}{', or one image file' if media == 'multipart/form-data' else ''}); "
                     "send fewer images per request (the server's limits: NAD_GUARD_MAX_BATCH, "
                     "NAD_GUARD_MAX_REQUEST_BYTES)")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refusal(HTTPStatus.BAD_REQUEST, f"invalid Content-Length header {_printable(declared)!r}",
                              close=True)
            if int(declared) > limit:
                raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large, close=True)
        body = await self._read_body(receive, limit, too_large)
        try:
            if media == NPY:
                return await self._run(read_npy, body, self.spec, max_batch, heavy=len(body) > INLINE_BYTES)
            if media == "application/json":
                return await self._run(json_batch, body, self.spec, max_batch, heavy=len(body) > INLINE_BYTES)
            return await self._form_batch(headers, body, multipart=media == "multipart/form-data", limits=limits,
                                          max_batch=max_batch)
        except InputError as e:
            raise Refusal(HTTPStatus.BAD_REQUEST, f"{e}{deep}" if probes and "more than the limit" in str(e)
                          else str(e)) from None

    async def _read_body(self, receive: t.Any, limit: int, too_large: str) -> bytes:
        """The whole body, at most ``limit`` bytes, within the body timeout."""
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large, close=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise Refusal(HTTPStatus.REQUEST_TIMEOUT, f"the request body did not arrive within "
                          f"{self.settings.body_timeout_s:g} s ({size:,} bytes received; NAD_GUARD_BODY_TIMEOUT_S)",
                          close=True) from None

    async def _run(self, fn: t.Callable[..., np.ndarray], *args: t.Any, heavy: bool) -> np.ndarray:
        """``fn(*args)``: on the event loop, or if ``heavy`` in a thread, one at a time in this process."""
        if not heavy:
            return fn(*args)
        if self._heavy is None:
            self._heavy = anyio.CapacityLimiter(1)
        result, error = await anyio.to_thread.run_sync(_returning_errors, fn, *args, limiter=self._heavy)
        if error is not None:
            raise InputError(error)
        return result

    async def _form_batch(self, headers: Headers, body: bytes, multipart: bool, limits: dict[str, int],
                          max_batch: int) -> np.ndarray:
        data = await self._parse_form(headers, body, multipart)
        field, value = choose_field(data)
        if len(value) > limits[field]:
            raise InputError(f"the part {field!r} is {len(value):,} bytes, more than the limit of "
                             f"{limits[field]:,} for it")
        if field == "image":
            return await self._run(decode_image, value, self.spec, self.settings.max_image_pixels, heavy=True)
        if field == "images_npy":
            return await self._run(read_npy, value, self.spec, max_batch, heavy=len(value) > INLINE_BYTES)
        return await self._run(text_batch, value, self.spec, max_batch, heavy=len(value) > INLINE_BYTES)

    async def _parse_form(self, headers: Headers, body: bytes, multipart: bool) -> dict[str, t.Any]:
        """Fields of a multipart or URL-encoded form (the BentoML client sends ``images`` alone
        URL-encoded): ``image`` and ``images_npy`` as file bytes, ``images`` as its JSON text."""
        kind = "multipart/form-data" if multipart else "form"
        if multipart:
            boundary = _boundary(headers.get("content-type", ""))
            if not boundary:
                raise InputError(f"malformed multipart/form-data body: the Content-Type header gives no boundary; "
                                 f"{USAGE}")
            if b"--" + boundary + b"--" not in body:
                raise InputError(f"malformed multipart/form-data body: it does not end with its closing boundary "
                                 f"'--{boundary.decode('latin-1')}--' (truncated?); {USAGE}")

        async def stream() -> t.AsyncGenerator[bytes, None]:
            yield body

        try:
            if multipart:
                form = await MultiPartParser(headers, stream(), max_files=3, max_fields=4,
                                             max_part_size=self.limits["images"]).parse()
            else:
                form = await FormParser(headers, stream(), max_fields=4, max_part_size=self.limits["images"]).parse()
        except (MultiPartException, ValueError, KeyError) as e:
            raise InputError(f"malformed {kind} body ({getattr(e, 'message', e)}); {USAGE}") from None
        data: dict[str, t.Any] = {}
        try:
            for key in set(form.keys()):
                values = form.getlist(key)
                if len(values) > 1:
                    raise InputError(f"field {_printable(key)!r} is given {len(values)} times; send it once "
                                     "(several images: use 'images' or 'images_npy', an (N, C, H, W) array)")
                value = values[0]
                if key in ("image", "images_npy"):
                    if not isinstance(value, UploadFile):
                        example = "image=@digit.png" if key == "image" else "images_npy=@batch.npy"
                        raise InputError(f"{key!r} must be a file part (curl -F {example}, not -F {key}=...)")
                    data[key] = await value.read()
                elif key == "images":
                    data[key] = (await value.read()) if isinstance(value, UploadFile) else value.encode()
                else:
                    data[key] = None  # reported as unknown
        finally:
            await form.close()
        return data


# ---------------------------------------------------------------------------------------- pure parts
def choose_field(data: dict[str, t.Any]) -> tuple[str, t.Any]:
    """The one input field of a request's fields (``None`` values count as absent); raises
    :class:`InputError` for unknown fields, none or several."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(repr(_printable(k)) for k in unknown)}; {USAGE}")
    given = [k for k in FIELDS if data.get(k) is not None]
    if len(given) != 1:
        names = [repr(k) for k in (given or FIELDS)]
        raise InputError((f"neither {', '.join(names[:-1])} nor {names[-1]} given" if not given else
                          f"both {' and '.join(names)} given" if len(given) == 2 else
                          f"all of {', '.join(names)} given") + f"; {USAGE}")
    return given[0], data[given[0]]


def json_batch(body: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    """An ``application/json`` body (``{"images": [...]}``) as a checked batch."""
    data = read_json_object(body)
    for key in ("image", "images_npy"):
        if data.get(key) is not None:
            raise InputError(f"{key!r} must be a file part of a multipart/form-data request (curl -F "
                             "image=@digit.png, -F images_npy=@batch.npy); JSON requests send 'images', an "
                             "(N, C, H, W) array")
    _, images = choose_field(data)
    return check_batch(images, spec, max_batch)


def text_batch(text: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    """A form's ``images`` field (JSON text) as a checked batch."""
    return check_batch(read_json_text(text, "images"), spec, max_batch)


def _returning_errors(fn: t.Callable[..., np.ndarray], *args: t.Any) -> tuple[np.ndarray | None, str | None]:
    """``fn(*args)`` in a worker thread, an :class:`InputError` returned as its message. Raised across
    the thread, the error would tie its traceback (the body and the parsed input, in the frames) to
    the asyncio future that carried it, in a reference cycle that only a full garbage collection
    frees: under maximal bodies each worker held 100-300 MB more than with the error returned."""
    try:
        return fn(*args), None
    except InputError as e:
        return None, str(e)


def _boundary(content_type: str) -> bytes:
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    return params.get(b"boundary", b"").strip(b'"')


def _has_body(scope: t.Any) -> bool:
    """Whether the request announces a body (so a refusal that does not read it must close)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _printable(text: str) -> str:
    """``text`` safe for one log line: control characters escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class _ClientGone(Exception):
    """The client disconnected before its body arrived: nothing to answer."""


def _replay_empty(receive: t.Any) -> t.Any:
    """``receive`` for the app behind the gate: the body was read here, so an empty one, then the
    connection's own messages (its disconnect)."""
    done = False

    async def replay() -> t.Any:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()
    return replay
