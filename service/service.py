"""nad-guard over HTTP (BentoML 1.4): predictions with a calibrated trust score.

    bentoml serve service.service:NadGuard --port 3000          # from the repository root

Endpoints (``POST``; each takes exactly one of the two inputs below):

``/predict_with_trust``
    one record per input image: ``label``, ``class_name``, ``confidence``, ``trust_score``,
    ``suspicion_score``, ``is_suspicious`` (score above the calibrated ``threshold``),
    ``nearest_path_class`` (+ ``_name``) and ``per_layer`` divergences (:meth:`Guard.predict`).
``/predict``
    plain classification, for comparison: ``label``, ``class_name``, ``confidence``.

Inputs:

* ``image``: one PNG or JPEG file, as a ``multipart/form-data`` file part
  (``curl -F image=@digit.png``); converted to the model's channels and size as
  :mod:`service.inputs` describes (grey/RGB conversion, bilinear resize, ``/ 255``).
* ``images``: a batch ``(N, C, H, W)`` of numbers in ``[0, 1]``, as JSON
  (``{"images": [...]}`` with ``Content-Type: application/json``), or as a JSON text part of a
  multipart request.

Anything else is answered 400 (415 for a body that is neither JSON nor a form, 413 for one over
``NAD_GUARD_MAX_REQUEST_BYTES``) with ``[{"error": "<what is wrong; what is expected>"}]``.
Also ``/healthz`` (= ``/livez``), ``/readyz`` and ``/metrics`` (BentoML's series plus
``nad_guard_*``: predictions and flags by predicted class, the trust-score histogram, refused
requests).

Two BentoML services, one ``bentoml serve``: :class:`NadGuard` answers HTTP (parsing, checks,
image decoding, metrics) and calls :class:`GuardRunner`, which holds the guard and runs it with
adaptive batching: concurrent requests are merged into one forward pass. Every forward pass is
padded to at least ``NAD_GUARD_MIN_FORWARD_BATCH`` rows (8) so that an input's result does not depend
on what it was batched with (the CPU kernels for very small batches round differently).
Configuration by environment variables: :mod:`service.loader`.
"""

from __future__ import annotations

import json
import os
import typing as t
from http import HTTPStatus
from pathlib import Path

import anyio
import bentoml
import numpy as np
import prometheus_client
import pydantic_core
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from service import bentoml_fixes
from service.inputs import InputError, check_batch, decode_image
from service.loader import ENV_TAG, Settings, load_guard, read_spec, resolve_source

if t.TYPE_CHECKING:
    from starlette.requests import Request

bentoml_fixes.apply()  # BentoML 1.4 keeps every request alive for `timeout` seconds otherwise
SETTINGS = Settings.from_env()  # the batching parameters are fixed when the class is defined
INLINE_CHECK_VALUES = 1 << 18  # arrays up to this many numbers are checked on the event loop (< 1 ms)
# A fixed response media type: without it BentoML 1.4 rebuilds the output's JSON schema on every
# response to find the media type (a fifth of the front end's time per request).
JSON = ContentType("application/json")
USAGE = ("send exactly one of 'image' (a PNG or JPEG file in a multipart/form-data request, e.g. "
         "curl -F image=@digit.png) or 'images' (a JSON array (N, C, H, W) of numbers in [0, 1], e.g. "
         "{\"images\": [...]} with Content-Type: application/json)")

# ---------------------------------------------------------------------------------------- metrics
PREDICTIONS = prometheus_client.Counter(
    "nad_guard_predictions", "Inputs scored by /predict_with_trust, by predicted class", ["predicted_class"])
FLAGGED = prometheus_client.Counter(
    "nad_guard_flagged", "Inputs flagged as suspicious (suspicion score above the calibrated threshold), "
    "by predicted class", ["predicted_class"])
TRUST = prometheus_client.Histogram(
    "nad_guard_trust_score", "Trust score (conformal p-value in (0, 1]; low = suspicious) of inputs scored "
    "by /predict_with_trust", buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))
REFUSED = prometheus_client.Counter(
    "nad_guard_refused_requests", "Requests refused by the input checks (4xx), by endpoint", ["endpoint"])


# ---------------------------------------------------------------------------------------- schemas
class GuardInput(bentoml.IODescriptor):
    """Exactly one of ``image`` (multipart file) or ``images`` (JSON array)."""

    model_config = ConfigDict(extra="forbid")

    # Plain types with a None default: BentoML 1.4 cannot build Optional[Path] / Optional[ndarray] fields.
    image: Path = Field(None, description="A PNG or JPEG file (multipart/form-data), converted to the "
                        "model's channels and size (grey/RGB, bilinear resize, /255).")
    images: np.ndarray = Field(None, description="A batch (N, C, H, W) of numbers in [0, 1] in the model's "
                               "exact size; at most NAD_GUARD_MAX_BATCH images.")

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> GuardInput:
        return await _parse_request(cls, request)


class LayerDivergence(BaseModel):
    layer: str = Field(description="Gate point (module name in the classifier).")
    divergence: float = Field(description="Share of the layer's pooled activation outside the predicted "
                              "class's sub-architecture, in [0, 1] (0 = entirely inside).")
    nearest_class: int = Field(description="Class whose sub-architecture best matches the path at this layer.")
    margin: float = Field(description="Predicted class's path match minus the best other class's, in [-1, 1].")


class Prediction(BaseModel):
    label: int = Field(description="Predicted class index.")
    class_name: str
    confidence: float = Field(description="Softmax probability of the predicted class.")


class TrustPrediction(Prediction):
    trust_score: float = Field(description="Conformal p-value in (0, 1] among clean held-out inputs; "
                               "higher = more trustworthy.")
    suspicion_score: float = Field(description="Detector score; higher = more suspicious.")
    is_suspicious: bool = Field(description="suspicion_score > threshold.")
    threshold: float = Field(description="Calibrated on clean held-out data at the guard's false-positive rate.")
    nearest_path_class: int = Field(description="Class whose sub-architecture is nearest the input's path "
                                    "at most layers.")
    nearest_path_class_name: str
    per_layer: list[LayerDivergence]


# ---------------------------------------------------------------------------------------- request parsing
def _error(message: str, status: HTTPStatus) -> BentoMLException:
    return BentoMLException(message, error_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them."""
    declared = request.headers.get("content-length")
    too_large = (f"the request body is larger than the limit of {limit:,} bytes (NAD_GUARD_MAX_REQUEST_BYTES); "
                 "send fewer images per request")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _error(too_large, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        except ValueError:
            raise InvalidArgument(f"invalid Content-Length header {declared!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _error(too_large, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_request(cls: type[GuardInput], request: Request) -> GuardInput:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media not in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded"):
        raise _error(f"unsupported Content-Type {content_type or '(none)'!r}; {USAGE}",
                     HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    body = await _read_body(request, SETTINGS.max_request_bytes)
    if media == "application/json":
        try:
            data = pydantic_core.from_json(body) if body.strip() else None
        except ValueError as e:
            raise InvalidArgument(f"the body is not valid JSON ({e}); {USAGE}") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"the JSON body must be an object like {{\"images\": [...]}}; {USAGE}")
        if "image" in data:
            raise InvalidArgument("'image' must be a file part of a multipart/form-data request "
                                  "(curl -F image=@digit.png); JSON requests send 'images', an (N, C, H, W) array")
    else:
        data = await _parse_form(request, body, multipart=media == "multipart/form-data")
    unknown = sorted(set(data) - {"image", "images"})
    if unknown:
        raise InvalidArgument(f"unknown field(s) {', '.join(map(repr, unknown))}; {USAGE}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
                            for err in e.errors(include_url=False, include_input=False))
        raise InvalidArgument(f"invalid input ({details}); {USAGE}") from None


async def _parse_form(request: Request, body: bytes, multipart: bool) -> dict[str, t.Any]:
    """Fields of a multipart or URL-encoded form (the BentoML client sends ``images`` alone URL-encoded)."""
    async def stream() -> t.AsyncGenerator[bytes, None]:
        yield body

    try:
        if multipart:
            form = await MultiPartParser(request.headers, stream(), max_files=2, max_fields=4,
                                         max_part_size=SETTINGS.max_request_bytes).parse()
        else:
            form = await FormParser(request.headers, stream(), max_fields=4,
                                    max_part_size=SETTINGS.max_request_bytes).parse()
    except (MultiPartException, ValueError, KeyError) as e:
        kind = "multipart/form-data" if multipart else "form"
        raise InvalidArgument(f"malformed {kind} body ({getattr(e, 'message', e)}); {USAGE}") from None
    data: dict[str, t.Any] = {}
    for key in set(form.keys()):
        values = form.getlist(key)
        if len(values) > 1:
            raise InvalidArgument(f"field {key!r} is given {len(values)} times; send it once "
                                  "(several images: use 'images', an (N, C, H, W) array)")
        value = values[0]
        if key == "image":
            if not isinstance(value, UploadFile):
                raise InvalidArgument("'image' must be a file part (curl -F image=@digit.png, not -F image=...)")
            data[key] = value
        elif key == "images":
            text = (await value.read()) if isinstance(value, UploadFile) else value
            try:
                data[key] = json.loads(text)
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidArgument(f"'images' must be JSON text of an (N, C, H, W) array ({e}); upload "
                                      "an image file as 'image' instead") from None
        else:
            data[key] = None  # reported as unknown
    return data


def _record_metrics(records: list[dict[str, t.Any]]) -> None:
    for r in records:
        PREDICTIONS.labels(predicted_class=r["class_name"]).inc()
        if r["is_suspicious"]:
            FLAGGED.labels(predicted_class=r["class_name"]).inc()
        TRUST.observe(r["trust_score"])


# ---------------------------------------------------------------------------------------- services
def _torch_threads(requested: int) -> int:
    """``requested``, or all usable cores but one (left to the HTTP process)."""
    if requested:
        return requested
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else 1


# runner_connection: BentoML 1.4 replaces its client session to the runner every `max_requests`
# calls or `max_age` seconds by closing the old one, which drops the calls still in flight on it
# (500 "Server disconnected" under concurrent load). The runner is a local socket: keep one session.
@bentoml.service(name="nad_guard_runner", workers=1, threads=1, traffic={"timeout": 120},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 1e12},
                 logging={"access": {"enabled": False}})  # internal calls; the front end logs each request
class GuardRunner:
    """Internal service (reachable only from :class:`NadGuard`): holds the guard and runs batches.

    Inputs are already checked float32 ``(N, C, H, W)`` in ``[0, 1]``."""

    if os.environ.get(ENV_TAG):  # so that `bentoml build` packs the stored guard into the bento
        stored_guard = bentoml.models.BentoModel(os.environ[ENV_TAG])

    def __init__(self) -> None:
        import torch

        from nad_guard.models import resolve_device

        settings = Settings.from_env()
        torch.set_num_threads(_torch_threads(settings.torch_threads))
        self.min_batch = settings.min_forward_batch
        self.guard = load_guard(resolve_source(), device=str(resolve_device(settings.device)))

    def _padded(self, x: np.ndarray) -> t.Any:
        import torch

        n = len(x)
        if n < self.min_batch:
            x = np.concatenate([x, np.zeros((self.min_batch - n, *x.shape[1:]), dtype=x.dtype)])
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=max(2, SETTINGS.max_batch),
                 max_latency_ms=SETTINGS.max_latency_ms)
    def trust(self, x: np.ndarray) -> t.Annotated[list[dict], JSON]:
        """Guard records for a batch (one forward pass)."""
        xp = self._padded(x)
        return self.guard.run(xp, batch_size=len(xp)).records(self.guard.classifier.class_names)[:len(x)]

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=max(2, SETTINGS.max_batch),
                 max_latency_ms=SETTINGS.max_latency_ms)
    def classify(self, x: np.ndarray) -> t.Annotated[np.ndarray, JSON]:
        """Softmax probabilities ``(N, K)`` float32 (one forward pass of the classifier alone)."""
        import torch

        clf = self.guard.classifier
        with torch.no_grad():
            xp = self._padded(x).to(clf.mean.device)
            return clf(xp).softmax(1)[:len(x)].float().cpu().numpy()


@bentoml.service(name="nad_guard", workers=1, traffic={"timeout": 120})
class NadGuard:
    """Predictions with a calibrated trust score (see the module docstring)."""

    runner = bentoml.depends(GuardRunner)

    @bentoml.on_deployment
    def check_guard() -> None:
        """Load the guard once in the serving process, before any worker starts: a missing, corrupt
        or incompatible guard stops `bentoml serve` with its message (workers that fail to start
        would otherwise be restarted forever)."""
        load_guard(resolve_source(), device="cpu")

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.source = resolve_source()
        self.spec, _ = read_spec(self.source)
        self.class_names = self.spec.class_names
        for name in self.class_names:  # every class's series exists from the start (at 0)
            PREDICTIONS.labels(predicted_class=name)
            FLAGGED.labels(predicted_class=name)

    async def _batch(self, endpoint: str, image: Path | None, images: np.ndarray | None) -> np.ndarray:
        try:
            if (image is None) == (images is None):
                raise InputError(f"{'both' if image is not None else 'neither'} 'image' and 'images' given; {USAGE}")
            if image is not None:
                return await anyio.to_thread.run_sync(decode_image, image.read_bytes(), self.spec,
                                                      self.settings.max_image_pixels)
            if images.size <= INLINE_CHECK_VALUES:  # fast enough for the event loop; no thread hop
                return check_batch(images, self.spec, self.settings.max_batch)
            return await anyio.to_thread.run_sync(check_batch, images, self.spec, self.settings.max_batch)
        except InputError as e:
            REFUSED.labels(endpoint=endpoint).inc()
            raise InvalidArgument(str(e)) from None

    async def _run(self, method: str, x: np.ndarray) -> t.Any:
        remote = getattr(self.runner, "to_async", None)
        if remote is not None:  # served: the runner is another process, batching concurrent calls
            return await getattr(remote, method)(x)
        return await anyio.to_thread.run_sync(getattr(self.runner, method), x)  # in-process

    @bentoml.api(input_spec=GuardInput)
    async def predict_with_trust(
            self, image: t.Optional[Path] = None, images: t.Optional[np.ndarray] = None,
    ) -> t.Annotated[list[TrustPrediction], JSON]:
        """The prediction for each input and whether to trust it (one record per image)."""
        x = await self._batch("predict_with_trust", image, images)
        records = await self._run("trust", x)
        _record_metrics(records)
        return records

    @bentoml.api(input_spec=GuardInput)
    async def predict(
            self, image: t.Optional[Path] = None, images: t.Optional[np.ndarray] = None,
    ) -> t.Annotated[list[Prediction], JSON]:
        """Plain classification (no trust score), for comparison."""
        x = await self._batch("predict", image, images)
        probs = np.asarray(await self._run("classify", x))
        labels = probs.argmax(1)
        return [{"label": int(k), "class_name": self.class_names[int(k)], "confidence": float(p[k])}
                for k, p in zip(labels, probs)]
