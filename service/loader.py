"""Where the service's guard comes from, its settings, and the BentoML model store.

The guard is, in this order of precedence (setting both variables is an error):

``NAD_GUARD_MODEL_TAG``
    a tag in the BentoML model store (``nad-guard:latest``, ``nad-guard:abc123``); put a guard
    directory there with ``python -m service.store DIR``.
``NAD_GUARD_DIR``
    a guard directory written by ``nad-guard fit-detector`` (or ``Guard.save``).
neither
    the bundled default guard (``nad_guard/default_guard``: the MNIST reference CNN).

The guard directory records how to rebuild its classifier (:func:`nad_guard.guard.rebuild_classifier`):
a reference or torchvision model by name, a factory by its ``package.module:function`` (its module must
be importable by the server: on ``PYTHONPATH``), an exported program by the directory's own copy.
``NAD_GUARD_CLASSIFIER=package.module:function`` (a function returning a
:class:`nad_guard.models.Classifier` with the guard's weights) replaces the recorded classifier; it is
needed only for a guard recorded as ``custom`` (a module wrapped by hand, which cannot be rebuilt).

Anything missing, corrupt or inconsistent raises :class:`GuardStartupError` at start-up, naming
the source and what to do; the server then does not start.
"""

from __future__ import annotations

import os
import typing as t
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from nad_guard.guard import DEFAULT_GUARD_DIR, Guard, read_guard_meta
from nad_guard.models import Classifier, InputSpec
from nad_guard.model_names import classifier_from_factory
from nad_guard.paths import ArtifactError

ENV_TAG, ENV_DIR, ENV_CLASSIFIER = "NAD_GUARD_MODEL_TAG", "NAD_GUARD_DIR", "NAD_GUARD_CLASSIFIER"
NPY_MAX_HEADER = 10_000  # bytes of .npy header read (numpy's own default; numpy.save writes about 128)
JSON_BYTES_PER_VALUE = 32  # JSON body allowance per number (see Settings.body_limits)


class GuardStartupError(RuntimeError):
    """The service cannot start: the guard is missing, corrupt or incompatible."""


def _number_env(env: Mapping[str, str], name: str, default: float, kind: type, valid: t.Callable[[float], bool],
                rule: str) -> t.Any:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise GuardStartupError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not valid(value):
        raise GuardStartupError(f"{name}={value} {rule}")
    return value


def _int_env(env: Mapping[str, str], name: str, default: int, lo: int = 1) -> int:
    return _number_env(env, name, default, int, lambda v: v >= lo, f"must be at least {lo}")


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    return _number_env(env, name, default, float, lambda v: 0 < v < float("inf"), "must be a positive number of seconds")


def _api_key(env: Mapping[str, str]) -> str:
    """The bearer token from ``NAD_GUARD_API_KEY`` or the file ``NAD_GUARD_API_KEY_FILE`` names (its
    first line); '' when neither is set. A key must be at least 16 visible ASCII characters."""
    key, path = env.get("NAD_GUARD_API_KEY") or "", env.get("NAD_GUARD_API_KEY_FILE") or ""
    if key and path:
        raise GuardStartupError("both NAD_GUARD_API_KEY and NAD_GUARD_API_KEY_FILE are set; set only one")
    where = "NAD_GUARD_API_KEY"
    if path:
        where = f"NAD_GUARD_API_KEY_FILE={path}"
        try:
            lines = Path(path).expanduser().read_text(encoding="ascii").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise GuardStartupError(f"{where}: cannot read the key ({e})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise GuardStartupError(f"{where}: the file is empty")
    if key and (len(key) < 16 or not all(33 <= ord(c) < 127 for c in key)):
        raise GuardStartupError(f"{where}: the key must be at least 16 visible ASCII characters without spaces "
                                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


@dataclass(frozen=True)
class Settings:
    """Service limits and runtime settings, from environment variables (defaults in brackets)."""

    max_batch: int = 256                  # NAD_GUARD_MAX_BATCH: images per request [256]
    max_image_pixels: int = 16_777_216    # NAD_GUARD_MAX_IMAGE_PIXELS: uploaded image w*h [16.8 M = 4096x4096]
    max_request_bytes: int = 64 << 20     # NAD_GUARD_MAX_REQUEST_BYTES: cap on every body [64 MiB] (see body_limits)
    body_timeout_s: float = 30.0          # NAD_GUARD_BODY_TIMEOUT_S: whole body received within [30 s], else 408
    max_latency_ms: int = 10_000          # NAD_GUARD_MAX_LATENCY_MS: adaptive batching bound [10 s]
    batch_wait_ms: int = 5                # NAD_GUARD_BATCH_WAIT_MS: cap on the learned batching wait [5]
    pad_multiple: int = 8                 # NAD_GUARD_PAD_ROWS: pad forward passes to a multiple of this [8]
    # NAD_GUARD_FORWARD_ROWS: rows per forward pass of a merged batch [128], rounded down to a multiple of
    # pad_multiple (nad_guard.guard.forward_step). On the 2-core test machine the MNIST CNN's forward pass gave
    # 8-32% fewer images/s at 256 rows than at 128 in repeated in-process runs (bench/results/serve_load.md).
    forward_rows: int = 128
    device: str = "cpu"                   # NAD_GUARD_DEVICE: cpu, cuda[:N] or auto [cpu]
    workers: int = 0                      # NAD_GUARD_WORKERS: serving processes, 0 = auto (see workers_for) [0]
    torch_threads: int = 0                # NAD_GUARD_TORCH_THREADS: per process, 0 = auto (see threads_for) [0]
    api_key: str = field(default="", repr=False)  # NAD_GUARD_API_KEY or NAD_GUARD_API_KEY_FILE [none: open]
    metrics_auth: bool = True             # NAD_GUARD_METRICS_AUTH: /metrics needs the key too, when one is set [1]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()
        return cls(max_batch=_int_env(env, "NAD_GUARD_MAX_BATCH", d.max_batch),
                   max_image_pixels=_int_env(env, "NAD_GUARD_MAX_IMAGE_PIXELS", d.max_image_pixels),
                   max_request_bytes=_int_env(env, "NAD_GUARD_MAX_REQUEST_BYTES", d.max_request_bytes),
                   body_timeout_s=_float_env(env, "NAD_GUARD_BODY_TIMEOUT_S", d.body_timeout_s),
                   max_latency_ms=_int_env(env, "NAD_GUARD_MAX_LATENCY_MS", d.max_latency_ms),
                   batch_wait_ms=_int_env(env, "NAD_GUARD_BATCH_WAIT_MS", d.batch_wait_ms, lo=0),
                   pad_multiple=_int_env(env, "NAD_GUARD_PAD_ROWS", d.pad_multiple),
                   forward_rows=_int_env(env, "NAD_GUARD_FORWARD_ROWS", d.forward_rows),
                   device=env.get("NAD_GUARD_DEVICE") or d.device,
                   workers=_int_env(env, "NAD_GUARD_WORKERS", d.workers, lo=0),
                   torch_threads=_int_env(env, "NAD_GUARD_TORCH_THREADS", d.torch_threads, lo=0),
                   api_key=_api_key(env),
                   metrics_auth=_int_env(env, "NAD_GUARD_METRICS_AUTH", int(d.metrics_auth), lo=0) != 0)

    def body_limits(self, spec: InputSpec) -> dict[str, int]:
        """The largest request body accepted, in bytes, per media type: what the largest valid request
        of this model (``max_batch`` images of ``spec``'s size, or one image file at the pixel limit)
        needs in that format, and never more than ``max_request_bytes``. Checked before a byte of the
        body is parsed (from Content-Length, and while it streams in).

        * ``application/x-npy``: the .npy header (at most ``NPY_MAX_HEADER`` bytes) and 4 bytes a value;
        * ``application/json`` and form-encoded: ``JSON_BYTES_PER_VALUE`` a value (``json.dumps`` of a
          float32 pixel takes at most 25 characters with its separator; the rest is room for spaces);
        * ``multipart/form-data``: the largest of those and of an image file of one byte per allowed
          pixel (a JPEG photo takes 0.2-0.8 bytes a pixel), plus room for the parts' headers. Each
          part is held to its own field's limit."""
        values = self.max_batch * spec.channels * spec.height * spec.width
        npy = 12 + NPY_MAX_HEADER + 4 * values
        text = JSON_BYTES_PER_VALUE * values + 4096
        image = self.max_image_pixels
        limits = {"application/x-npy": npy, "application/json": text, "application/x-www-form-urlencoded": text,
                  "multipart/form-data": max(npy, text, image) + 65_536,
                  "image": image, "images": text, "images_npy": npy}  # the parts of a multipart body
        return {k: min(v, self.max_request_bytes) for k, v in limits.items()}

    def workers_for(self, cores: int) -> int:
        """Serving processes: ``workers``, or for 0 (auto) two on a CPU device with at least two
        cores, else one. Each process parses requests on its own event loop and runs its own merged
        batches, so one parses while the other computes: at concurrency 32 one process kept 1.50-1.65
        of 2 cores busy, two kept 1.89-1.96 (bench/results/serve_load_runs/, runs 7 and 8). On CUDA
        one process holds the GPU (two on a GPU were not measured)."""
        if self.workers:
            return self.workers
        return 1 if cores < 2 or _on_cuda(self.device) else 2

    def threads_for(self, cores: int, workers: int) -> int:
        """Torch threads per process: ``torch_threads``, or for 0 (auto) the cores shared out between
        ``workers`` processes (at least one each); a single process takes all cores but one (left to
        the HTTP event loop), and at least two where there are two."""
        if self.torch_threads:
            return self.torch_threads
        if workers > 1:
            return max(1, cores // workers)
        return min(cores, max(2, cores - 1))


def _on_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class GuardSource:
    """Where the guard is: ``kind`` is ``store``, ``dir`` or ``default``; ``path`` its directory."""

    kind: str
    name: str
    path: Path

    def __str__(self) -> str:
        return {"store": f"model store tag {self.name} ({self.path})", "dir": f"{ENV_DIR}={self.name}",
                "default": f"the bundled default guard ({self.path})"}[self.kind]


def resolve_source(env: Mapping[str, str] | None = None) -> GuardSource:
    """The guard's source from ``NAD_GUARD_MODEL_TAG`` / ``NAD_GUARD_DIR`` (see the module docstring)."""
    env = os.environ if env is None else env
    tag, directory = env.get(ENV_TAG) or None, env.get(ENV_DIR) or None
    if tag and directory:
        raise GuardStartupError(f"both {ENV_TAG}={tag!r} and {ENV_DIR}={directory!r} are set; set only one")
    if tag:
        import bentoml
        from bentoml.exceptions import BentoMLException

        try:
            model = bentoml.models.get(tag)
        except (BentoMLException, ValueError) as e:
            raise GuardStartupError(f"{ENV_TAG}={tag!r}: no such model in the BentoML model store "
                                    f"({e}); list them with `bentoml models list`, add one with "
                                    "`python -m service.store GUARD_DIR`") from e
        return GuardSource("store", str(model.tag), Path(model.path))
    if directory:
        return GuardSource("dir", directory, Path(directory).expanduser().resolve())
    return GuardSource("default", "default", DEFAULT_GUARD_DIR)


def _classifier_from_env(env: Mapping[str, str]) -> Classifier | None:
    ref = env.get(ENV_CLASSIFIER)
    if not ref:
        return None
    try:
        return classifier_from_factory(ref)
    except ValueError as e:
        raise GuardStartupError(f"{ENV_CLASSIFIER}: {e}") from e


def load_guard(source: GuardSource, device: str = "cpu", env: Mapping[str, str] | None = None) -> Guard:
    """The guard at ``source``, validated (:meth:`Guard.load`), on ``device``."""
    env = os.environ if env is None else env
    hint = {"default": "the package data is missing or damaged: reinstall nad-guard, or rebuild it with "
                       "`nad-guard build-default`",
            "dir": "point it at a directory written by `nad-guard fit-detector`",
            "store": "re-import the guard with `python -m service.store GUARD_DIR`"}[source.kind]
    if not source.path.is_dir():
        raise GuardStartupError(f"cannot load the guard from {source}: not a directory; {hint}")
    try:
        return Guard.load(source.path, device=device, classifier=_classifier_from_env(env))
    except (ArtifactError, FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise GuardStartupError(f"cannot load the guard from {source}: {e}; {hint}") from e


def read_spec(source: GuardSource) -> tuple[InputSpec, dict]:
    """The classifier's input spec and the detector's metadata from ``meta.json`` alone (no weights),
    for the HTTP front end; raises :class:`GuardStartupError` if they are missing or malformed."""
    try:
        meta = read_guard_meta(source.path)
    except ArtifactError as e:
        raise GuardStartupError(f"cannot load the guard from {source}: {e}") from e
    return InputSpec.from_dict(meta["classifier"]["spec"]), dict(meta["detector"])
