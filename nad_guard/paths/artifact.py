"""The file format of a saved :class:`~nad_guard.paths.PathModel`, and the checks that a saved one fits.

:meth:`PathModel.save` writes a directory with ``meta.json`` (format, version, model
reference, layers, the gate points' record (``gate_points``: how they were found, their kind, spatial size
and depth, the network's depth and the share of it they cover, see
:meth:`~nad_guard.paths.GateDiscovery.to_meta`; artifacts written before it was added load without it),
class names, training config and metrics, library versions, and a ``detector`` key reserved for a
detector saved later into the same directory) and ``paths.safetensors``
(``gates/<layer>`` float32 ``(K, C_l)``, ``masks/<layer>`` bool ``(K, C_l)``, and the statistics
``stats/mean/<layer>``, ``stats/std/<layer>`` float32 ``(C_l,)`` and ``stats/centroids/<layer>``
float32 ``(K, C_l)``). :meth:`PathModel.load` validates all of it against the classifier and raises
:class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from nad_guard import __version__
from nad_guard.models import Classifier
from nad_guard.paths.features import ChannelStats
from nad_guard.paths.gate_points import GatePoint, discover_gate_points, find_gate_points

ARTIFACT_FORMAT = "nad-guard-paths"
ARTIFACT_VERSION = 2  # 2: channel statistics (version 1 artifacts must be refitted)
META_FILE, TENSOR_FILE = "meta.json", "paths.safetensors"
SPEC_KEYS = ("channels", "height", "width", "mean", "std")


class ArtifactError(ValueError):
    """A saved path artifact is missing, corrupt, or does not fit the classifier."""


def write_artifact(path: str | Path, classifier: Classifier, gate_points: Sequence[GatePoint],
                   gates: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                   stats: Mapping[str, ChannelStats], *, class_names: list[str], training: dict[str, Any],
                   metrics: dict[str, Any]) -> Path:
    """Write ``meta.json`` and ``paths.safetensors`` (see the module docstring) for the learned state of a
    :class:`~nad_guard.paths.PathModel` into directory ``path`` (created if needed); ``meta["detector"]``
    is ``None``. :meth:`PathModel.save <nad_guard.paths.PathModel.save>` calls it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n in [p.name for p in gate_points]:
        tensors[f"gates/{n}"] = gates[n].contiguous()
        tensors[f"masks/{n}"] = masks[n].contiguous()
        st = stats[n]
        tensors[f"stats/mean/{n}"] = st.mean.contiguous()
        tensors[f"stats/std/{n}"] = st.std.contiguous()
        tensors[f"stats/centroids/{n}"] = st.centroids.contiguous()
    save_file(tensors, str(path / TENSOR_FILE))
    meta = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
        "model": {"name": classifier.name, "input_spec": classifier.spec.to_dict(),
                  "weights_sha256": weights_fingerprint(classifier)},
        "layers": [{"name": p.name, "channels": p.channels} for p in gate_points],
        "gate_points": discover_gate_points(classifier, [p.name for p in gate_points], warn=False).to_meta(),
        "class_names": class_names, "training": training, "metrics": metrics,
        "versions": library_versions(), "detector": None,
    }
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_artifact(path: str | Path, classifier: Classifier, *, check_weights: bool = True
                  ) -> tuple[dict[str, Any], list[str], dict[str, torch.Tensor], dict[str, torch.Tensor],
                             dict[str, ChannelStats]]:
    """Read the artifact in directory ``path`` written by :func:`write_artifact`, checked against ``classifier``:
    its ``meta.json``, the gate point names, and gates, masks and statistics per name.
    :meth:`PathModel.load <nad_guard.paths.PathModel.load>` installs them.

    Raises :class:`ArtifactError` if files are missing or corrupt, the format version is unknown,
    or it does not fit ``classifier`` (input spec, classes, layer names, channel counts, and, with
    ``check_weights``, the weights fingerprint).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    mine = classifier.spec.to_dict()
    try:
        model = dict(meta["model"])
        layers = [(str(d["name"]), int(d["channels"])) for d in meta["layers"]]
        spec = {k: [float(v) for v in _as_list(model["input_spec"][k])] for k in SPEC_KEYS}
        class_names = [str(c) for c in meta["class_names"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path / META_FILE} lacks a required field or has a malformed one: {e!r}") from e
    for key in SPEC_KEYS:
        if spec[key] != [float(v) for v in _as_list(mine[key])]:
            raise ArtifactError(f"artifact {path} was made for input {key}={spec[key]}, "
                                f"the classifier has {mine[key]}")
    if class_names != classifier.class_names:
        raise ArtifactError(f"artifact {path} has classes {class_names[:10]}, the classifier has "
                            f"{classifier.class_names[:10]}")
    if check_weights and model.get("weights_sha256") != weights_fingerprint(classifier):
        raise ArtifactError(f"artifact {path} was learned for other weights than this classifier's "
                            f"({model.get('name')!r}); pass check_weights=False to load it anyway")
    try:
        points = find_gate_points(classifier, [n for n, _ in layers])
    except ValueError as e:
        raise ArtifactError(f"artifact {path} does not fit the classifier: {e}") from e
    for p, (name, channels) in zip(points, layers):
        if p.channels != channels:
            raise ArtifactError(f"layer {name!r} has {p.channels} channels in the classifier, "
                                f"{channels} in artifact {path}")
    tfile = path / TENSOR_FILE
    if not tfile.is_file():
        raise ArtifactError(f"{tfile} is missing")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {tfile}: {e}") from e
    try:
        gates = {n: tensors[f"gates/{n}"] for n, _ in layers}
        masks = {n: tensors[f"masks/{n}"] for n, _ in layers}
        stats = {n: ChannelStats(tensors[f"stats/mean/{n}"], tensors[f"stats/std/{n}"],
                                 tensors[f"stats/centroids/{n}"]) for n, _ in layers}
    except KeyError as e:
        raise ArtifactError(f"{tfile} lacks tensor {e}") from e
    return meta, [n for n, _ in layers], gates, masks, stats


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a path artifact (or guard) directory, checked to be an artifact of the version this
    library reads; :class:`ArtifactError` says what is wrong otherwise."""
    meta_file = path / META_FILE
    if not path.is_dir():
        raise ArtifactError(f"no path artifact at {path}: not a directory")
    if not meta_file.is_file():
        raise ArtifactError(f"{meta_file} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{meta_file} is not a {ARTIFACT_FORMAT} artifact")
    if meta.get("version") != ARTIFACT_VERSION:
        hint = (" (version 1 artifacts lack the channel statistics: refit with `nad-guard fit-paths`)"
                if meta.get("version") == 1 else "")
        raise ArtifactError(f"{meta_file} has format version {meta.get('version')!r}; this nad-guard "
                            f"({__version__}) reads version {ARTIFACT_VERSION}{hint}")
    return meta


def weights_fingerprint(classifier: Classifier) -> str:
    """SHA-256 over the names and bytes of ``classifier.net``'s state dict (device independent)."""
    h = hashlib.sha256()
    for name, t in classifier.net.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    return {"nad_guard": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__}
