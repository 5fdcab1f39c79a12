"""nad-guard over HTTP (BentoML 1.4): predictions with a calibrated trust score.

    bentoml serve service.service:NadGuard --port 3000          # from the repository root

Endpoints (``POST``; each takes exactly one of the three inputs below):

``/predict_with_trust``
    one record per input image: ``label``, ``class_name``, ``confidence``, ``trust_score``,
    ``suspicion_score``, ``is_suspicious`` (score above the calibrated ``threshold``),
    ``nearest_path_class`` (+ ``_name``) and ``per_layer`` divergences (:meth:`Guard.predict`); a guard
    with an error detector (:mod:`nad_guard.errors`) adds ``attack_p_value``, ``error_p_value``,
    ``error_score`` and ``error_threshold``, and its ``trust_score`` / ``is_suspicious`` are the combined ones.
``/predict_with_trust?probes=K``
    deep mode (:mod:`nad_guard.deep`), for a guard fitted with ``nad-guard fit-detector --probes K``: the
    same records, scored by the deep detector from one pass of each image and its ``K`` probes, with
    ``mode: "deep"`` and ``probes: K``. ``probes`` takes 0 (the default: single pass) or the guard's ``K``
    (400 otherwise); a deep request holds at most ``NAD_GUARD_MAX_BATCH // (K + 1)`` images. The gate hands
    deep requests to the endpoint ``predict_with_trust_deep``, whose batches hold deep requests only (its
    own route is not served directly).
``/predict``
    plain classification, for comparison: ``label``, ``class_name``, ``confidence``.

Inputs:

* ``image``: one PNG or JPEG file, as a ``multipart/form-data`` file part
  (``curl -F image=@digit.png``); converted to the model's channels and size as
  :mod:`service.inputs` describes (grey/RGB conversion, bilinear resize, ``/ 255``).
* ``images``: a batch ``(N, C, H, W)`` of numbers in ``[0, 1]``, as JSON
  (``{"images": [...]}`` with ``Content-Type: application/json``), or as a JSON text part of a
  multipart request.
* ``images_npy``: the same batch as a ``.npy`` file (``numpy.save``), ``float32`` in ``[0, 1]`` or
  ``uint8`` (divided by 255): the whole body with ``Content-Type: application/x-npy``
  (``curl --data-binary @batch.npy -H 'Content-Type: application/x-npy'``), or a multipart file part
  ``images_npy`` (``curl -F images_npy=@batch.npy``). Parsed from its header alone
  (:func:`service.inputs.read_npy`; never unpickled) and checked like JSON; the compact input (4 or 1
  bytes a pixel instead of about 7 characters of JSON, and no number parsing).

Anything else is answered 400 (401 without the key when one is set, 408 for a body that does not
arrive in time, 413 for one over its media type's limit, 415 for one that is none of JSON, .npy or a
form) with ``[{"error": "<what is wrong; what is expected>"}]``, by the gate in front of BentoML
(:mod:`service.gate`, which also serves ``/docs.json``: :mod:`service.openapi`).
Also ``/healthz`` (= ``/livez``), ``/readyz`` (200 with the detector's calibration size and false-positive
bounds as JSON once ready: :mod:`service.readiness`) and ``/metrics`` (BentoML's series plus
``nad_guard_*``: predictions and flags by predicted class, the trust-score histogram, refused
requests, requests for unknown paths).

One BentoML service in ``NAD_GUARD_WORKERS`` processes (:meth:`service.loader.Settings.workers_for`:
two on a CPU with two cores or more, each with its share of the cores as torch threads). In each,
the gate reads, parses and checks each request on the HTTP event loop (in a thread for large
bodies and image files; bad input is a 400 before it reaches BentoML), and both endpoints are *batchable*: BentoML's adaptive
batching merges concurrent requests into one forward pass, run in a worker thread while the event
loop goes on parsing. (Until November 2026 the guard ran in a second BentoML service behind an
internal HTTP hop, which about doubled the server's CPU per single-image request.) Every forward
pass is padded with zero images to a multiple of ``NAD_GUARD_PAD_ROWS`` rows (8;
:func:`nad_guard.guard.pad_rows`) so that an input's result is bit-identical whatever it was batched
with (CPU kernels round a row differently in batches of other sizes). Configuration by environment
variables: :mod:`service.loader`.
"""

from __future__ import annotations

import collections
import functools
import os
import typing as t
from pathlib import Path

import bentoml
import numpy as np
import prometheus_client
import pydantic_core
from _bentoml_sdk.io_models import IORootModel  # BentoML 1.4's base of list outputs (not re-exported)
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from service import bentoml_fixes, openapi
from service.gate import BATCH_KEY, Gate
from service.loader import ENV_TAG, Settings, load_guard, read_spec, resolve_source, usable_cores
from service.readiness import ReadyDetail

if t.TYPE_CHECKING:
    from starlette.requests import Request

bentoml_fixes.apply()  # BentoML 1.4 keeps every request alive for `timeout` seconds otherwise
SETTINGS = Settings.from_env()  # the batching parameters are fixed when the class is defined
bentoml_fixes.cap_batching_wait(SETTINGS.batch_wait_ms / 1000)  # else a burst leaves lone requests held back
TIMEOUT_S = 120  # BentoML's request timeout (504 after it)

def _deep_k() -> int:
    """The served guard's deep-mode probes (``meta["deep"]["probes"]["k"]``), 0 without a deep detector or
    when the guard cannot be read here (start-up then stops with the loader's message)."""
    try:
        from nad_guard.guard import read_guard_meta

        deep = read_guard_meta(resolve_source().path).get("deep")
        return int(deep["probes"]["k"]) if isinstance(deep, dict) else 0
    except Exception:  # noqa: BLE001 - reported by check_guard at start-up
        return 0


DEEP_K = _deep_k()  # fixed when the class is defined, like the batching parameters
DEEP_ROUTE = ("/predict_with_trust", "/predict_with_trust_deep")  # public route + ?probes=K, internal route

# ---------------------------------------------------------------------------------------- metrics
PREDICTIONS = prometheus_client.Counter(
    "nad_guard_predictions", "Inputs scored by /predict_with_trust, by predicted class", ["predicted_class"])
FLAGGED = prometheus_client.Counter(
    "nad_guard_flagged", "Inputs flagged as suspicious (suspicion score above the calibrated threshold), "
    "by predicted class", ["predicted_class"])
TRUST = prometheus_client.Histogram(
    "nad_guard_trust_score", "Trust score (conformal p-value in (0, 1]; low = suspicious) of inputs scored "
    "by /predict_with_trust", buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))


# ---------------------------------------------------------------------------------------- schemas
class GuardInput(bentoml.IODescriptor):
    """Exactly one of ``image`` (multipart file), ``images`` (JSON array) or ``images_npy`` (.npy file,
    multipart, or the whole body as ``application/x-npy``). The fields document the API (OpenAPI, the
    BentoML client); requests are parsed and checked by the gate (:mod:`service.gate`)."""

    model_config = ConfigDict(extra="forbid")

    # Plain types with a None default: BentoML 1.4 cannot build Optional[Path] / Optional[ndarray] fields.
    image: Path = Field(None, description="A PNG or JPEG file (multipart/form-data), converted to the "
                        "model's channels and size (grey/RGB, bilinear resize, /255).")
    images: np.ndarray = Field(None, description="A batch (N, C, H, W) of numbers in [0, 1] in the model's "
                               "exact size; at most NAD_GUARD_MAX_BATCH images.")
    images_npy: Path = Field(None, description="The same batch as a .npy file (numpy.save), float32 in [0, 1] "
                             "or uint8 (divided by 255); or send the .npy as the whole body with "
                             "Content-Type: application/x-npy.")

    @classmethod
    async def from_http_request(cls, request: Request, serde: t.Any) -> CheckedBatch:  # type: ignore[override]
        """The batch the gate read, parsed and checked (:mod:`service.gate`, in front of BentoML)."""
        x = request.scope.get(BATCH_KEY)
        if x is None:  # pragma: no cover - only if the gate were not installed
            raise RuntimeError("the request did not pass service.gate.Gate (see bentoml_fixes.wrap_asgi)")
        return CheckedBatch(x)


class LayerDivergence(BaseModel):
    layer: str = Field(description="Gate point (module name in the classifier).")
    divergence: float = Field(description="Share of the layer's pooled activation outside the predicted "
                              "class's sub-architecture, in [0, 1] (0 = entirely inside).")
    nearest_class: int = Field(description="Class whose sub-architecture best matches the path at this layer.")
    margin: float = Field(description="Predicted class's path match minus the best other class's, in standard "
                          "deviations of the channels' activations (positive: the predicted class matches best).")


class Prediction(BaseModel):
    label: int = Field(description="Predicted class index.")
    class_name: str
    confidence: float = Field(description="Softmax probability of the predicted class.")


class TrustPrediction(Prediction):
    trust_score: float = Field(description="Conformal p-value in (0, 1] among clean held-out inputs; "
                               "higher = more trustworthy.")
    suspicion_score: float = Field(description="Detector score (a guard with an error detector: the attack "
                                   "detector's); higher = more suspicious.")
    is_suspicious: bool = Field(description="suspicion_score > threshold; with an error detector, also when "
                                "error_score > error_threshold. Either way: trust_score <= the guard's rate.")
    threshold: float = Field(description="Calibrated on clean held-out data at the guard's false-positive rate "
                             "(with an error detector: at the attack detector's share of it).")
    attack_p_value: float | None = Field(default=None, description=(
        "Guards with an error detector only (absent otherwise): the attack detector's conformal p-value "
        "(is this input an attack?); trust_score = min(1, attack_p_value / s, error_p_value / (1 - s)), s the "
        "attack detector's share of the false-positive rate (0.5 by default)."))
    error_p_value: float | None = Field(default=None, description=(
        "Guards with an error detector only (absent otherwise): the error detector's conformal p-value among "
        "correctly classified held-out inputs (is this prediction wrong?)."))
    error_score: float | None = Field(default=None, description=(
        "Guards with an error detector only: its score, higher = more likely a misprediction."))
    error_threshold: float | None = Field(default=None, description=(
        "Guards with an error detector only: its threshold, calibrated at its share of the false-positive rate."))
    nearest_path_class: int = Field(description="Class whose sub-architecture is nearest the input's whole path "
                                    "(class scores averaged over gate points).")
    nearest_path_class_name: str
    per_layer: list[LayerDivergence]


class JSONList(IORootModel):
    """A list of records answered as compact JSON, without BentoML 1.4's output path (which validates
    every record into its model, dumps it twice and serialises it with the json module: 0.9 ms per
    32 records against 0.06 ms here). The records are built by this module, so the schema (OpenAPI,
    the BentoML client) is kept by the subclasses' ``root`` type alone."""

    media_type: t.ClassVar[str] = "application/json"

    @classmethod
    async def to_http_response(cls, obj: t.Any, serde: t.Any) -> Response:
        return Response(pydantic_core.to_json(obj), media_type="application/json")


class TrustPredictions(JSONList):
    root: list[TrustPrediction]


class Predictions(JSONList):
    root: list[Prediction]


# ---------------------------------------------------------------------------------------- requests
class CheckedBatch:
    """What :meth:`GuardInput.from_http_request` hands to BentoML: the checked batch as the endpoint's
    one argument. BentoML 1.4 passes ``{name: getattr(obj, name) for name in obj.model_fields}`` to
    the endpoint, and a batchable endpoint takes exactly one argument (``image``/``images``/
    ``images_npy`` all become this float32 ``(N, C, H, W)`` array)."""

    model_fields = {"x": None}
    __slots__ = ("x",)

    def __init__(self, x: np.ndarray) -> None:
        self.x = x


@functools.cache
def _spec() -> t.Any:
    """The served model's :class:`~nad_guard.models.InputSpec` (from the guard's meta.json)."""
    return read_spec(resolve_source())[0]


def _record_metrics(records: list[dict[str, t.Any]]) -> None:
    """One counter update per class seen in the batch (a labelled series' lookup and lock cost more
    than the increment), one histogram observation per input."""
    predicted = collections.Counter(r["class_name"] for r in records)
    flagged = collections.Counter(r["class_name"] for r in records if r["is_suspicious"])
    for name, count in predicted.items():
        PREDICTIONS.labels(predicted_class=name).inc(count)
    for name, count in flagged.items():
        FLAGGED.labels(predicted_class=name).inc(count)
    for r in records:
        TRUST.observe(r["trust_score"])


# ---------------------------------------------------------------------------------------- service
# Both endpoints: GuardInput parses and checks each request on the event loop; BentoML merges
# concurrent requests' arrays (up to max_batch_size rows) into one call and splits the returned list
# of records (one per row) back into each request's share.
BATCHING = dict(batchable=True, batch_dim=0, max_batch_size=max(2, SETTINGS.max_batch),
                max_latency_ms=SETTINGS.max_latency_ms, input_spec=GuardInput)
# deep requests (each image K + 1 rows): merged batches of at most NAD_GUARD_MAX_BATCH rows of work
DEEP_BATCHING = {**BATCHING, "max_batch_size": max(2, SETTINGS.max_batch // (DEEP_K + 1))}


WORKERS = SETTINGS.workers_for(usable_cores())


@bentoml.service(name="nad_guard", workers=WORKERS, threads=1, traffic={"timeout": TIMEOUT_S})
class NadGuard:
    """Predictions with a calibrated trust score (see the module docstring)."""

    if os.environ.get(ENV_TAG):  # so that `bentoml build` packs the stored guard into the bento
        stored_guard = bentoml.models.BentoModel(os.environ[ENV_TAG])

    @bentoml.on_deployment
    def check_guard() -> None:
        """Load the guard once in the serving process, before any worker starts: a missing, corrupt
        or incompatible guard stops `bentoml serve` with its message (workers that fail to start
        would otherwise be restarted forever)."""
        load_guard(resolve_source(), device="cpu")

    def __init__(self) -> None:
        import torch

        from nad_guard.models import resolve_device

        self.settings = settings = Settings.from_env()
        torch.set_num_threads(settings.threads_for(usable_cores(), WORKERS))
        self.guard = load_guard(resolve_source(), device=str(resolve_device(settings.device)))
        self.class_names = self.guard.classifier.class_names
        for name in self.class_names:  # every class's series exists from the start (at 0)
            PREDICTIONS.labels(predicted_class=name)
            FLAGGED.labels(predicted_class=name)

    # `x`: the float32 (N, C, H, W) rows of one or more requests, checked; one forward pass.
    @bentoml.api(**BATCHING, output_spec=TrustPredictions)
    def predict_with_trust(self, x: np.ndarray) -> list[dict[str, t.Any]]:
        """The prediction for each input and whether to trust it (one record per image)."""
        import torch

        records = self.guard.run(torch.from_numpy(x), batch_size=self.settings.forward_rows,
                                 pad_multiple=self.settings.pad_multiple).records(self.class_names)
        _record_metrics(records)
        return records

    @bentoml.api(**DEEP_BATCHING, output_spec=TrustPredictions)
    def predict_with_trust_deep(self, x: np.ndarray) -> list[dict[str, t.Any]]:
        """Deep mode (reached as ``/predict_with_trust?probes=K`` through the gate; one pass of the inputs
        and their probes)."""
        import torch

        records = self.guard.run(torch.from_numpy(x), batch_size=self.settings.forward_rows,
                                 pad_multiple=self.settings.pad_multiple, deep=True).records(self.class_names)
        _record_metrics(records)
        return records

    @bentoml.api(**BATCHING, output_spec=Predictions)
    def predict(self, x: np.ndarray) -> list[dict[str, t.Any]]:
        """Plain classification (no trust score), for comparison."""
        import torch

        probs = self.guard.probabilities(torch.from_numpy(x), batch_size=self.settings.forward_rows,
                                         pad_multiple=self.settings.pad_multiple).numpy()
        labels = probs.argmax(1)
        return [{"label": int(k), "class_name": self.class_names[int(k)], "confidence": float(p[k])}
                for k, p in zip(labels, probs)]


def _public_paths() -> list[str]:
    return [f"/{name}" for name in NadGuard.apis if f"/{name}" != DEEP_ROUTE[1]]


def _openapi_document() -> dict[str, t.Any]:
    """``/docs.json``: BentoML's document with the prediction routes described as the gate serves them."""
    return openapi.document(NadGuard.openapi_spec.asdict(), SETTINGS, _spec(), _public_paths(),
                            deep_probes=DEEP_K, deep_route=DEEP_ROUTE)


def _gate(app: t.Any) -> Gate:
    return Gate(app, settings=SETTINGS, spec=_spec(), predict_paths=_public_paths(),
                openapi=functools.cache(_openapi_document),
                timeouts={504: f"the request was not answered within {TIMEOUT_S} s (the server's request timeout)"},
                deep_probes=DEEP_K, deep_route=DEEP_ROUTE)


bentoml_fixes.wrap_asgi(NadGuard, _gate)  # the gate runs before BentoML's own middleware (service.gate)
NadGuard.add_asgi_middleware(ReadyDetail)  # /readyz: the detector and its calibration's guarantees (service.readiness)
