"""The architecture encoder of Interpretable Neural Network Decoupling (Li et al., ECCV 2020), runtime part.

At every gate point ``l`` of a frozen classifier an *architecture controlling module* reads the layer's
input, global-average-pooled to ``(N, C_{l-1})``, and outputs one gate per output channel through a
small fully connected network (``Linear -> ReLU -> Linear -> sigmoid``). The gate multiplies the gate
point's output (a forward hook, :func:`nad_guard.hooks.hooked`); the classifier itself never changes.

"The layer's input" is the output of the previous gate point (already gated), and for the first gate
point the normalised image: the span between two consecutive gate points is one "layer". For a ResNet
whose gate points are its blocks this is exactly each block's input; for a plain CNN it is the input
of the convolutions that lead to the gate point. Because every gate depends only on what comes before
its layer, the gates are known before the layer runs, which is what lets
:mod:`nad_guard.encoder.accelerate` skip the closed channels.

Gates: ``soft`` (``sigmoid``, in ``(0, 1)``: the encoding, used for features) or ``hard`` (``logit > 0``,
exactly 0/1: the decoupled network, used for acceleration; during training a straight-through estimator).

Saved beside a guard or path artifact (``encoder.safetensors`` + ``encoder.json``, format
``nad-guard-encoder`` version :data:`ENCODER_VERSION`): the control modules' weights, the auxiliary
classifier of the mutual-information bound, and the class-mean encodings (``class_means/<layer>``
``(K, C_l)``: the mean soft gate of training images, by the frozen classifier's prediction).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from nad_guard.hooks import hooked, pool
from nad_guard.models import Classifier
from nad_guard.paths import ArtifactError, apply_gate, find_gate_points, library_versions, weights_fingerprint

ENCODER_FORMAT = "nad-guard-encoder"
ENCODER_VERSION = 1
ENCODER_META, ENCODER_TENSORS = "encoder.json", "encoder.safetensors"


class ControlModule(nn.Module):
    """Pooled layer input ``(N, C_in)`` -> gate logits ``(N, C_out)``; starts open (bias ``init_logit``)."""

    def __init__(self, c_in: int, c_out: int, hidden: int, init_logit: float = 1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c_in, hidden), nn.Linear(hidden, c_out)
        with torch.no_grad():
            self.fc2.weight.mul_(0.1)  # small: every gate starts open, but already depends on the input
        nn.init.constant_(self.fc2.bias, float(init_logit))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(pooled)))


def gate_values(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """``soft``: ``sigmoid``; ``hard``: ``logit > 0`` as 0/1 (forward) with the sigmoid's gradient (backward)."""
    soft = torch.sigmoid(logits)
    if mode == "soft":
        return soft
    if mode == "hard":
        return (logits > 0).to(soft.dtype) + (soft - soft.detach())
    raise ValueError(f"gate mode must be 'soft' or 'hard', got {mode!r}")


class ArchitectureEncoder(nn.Module):
    """One :class:`ControlModule` per gate point of ``classifier`` (names ``layers``; ``None``: automatic)
    and the auxiliary classifier ``aux`` (concatenated gates -> classes) of the mutual-information bound.

    ``hidden``: the control modules' hidden width (default ``max(8, C_out // 4)``). The classifier is held,
    not owned: it is not in ``state_dict`` and never changes.
    """

    def __init__(self, classifier: Classifier, layers: Sequence[str] | None = None, *, hidden: int | None = None,
                 init_logit: float = 1.0):
        super().__init__()
        object.__setattr__(self, "classifier", classifier)  # not a submodule: frozen, saved elsewhere
        self.gate_points = find_gate_points(classifier, layers)
        self.names = [p.name for p in self.gate_points]
        ins = [classifier.spec.channels] + [p.channels for p in self.gate_points[:-1]]
        self.hidden = hidden
        self.controls = nn.ModuleList(
            ControlModule(ci, p.channels, hidden or max(8, p.channels // 4), init_logit)
            for ci, p in zip(ins, self.gate_points))
        self.aux = nn.Linear(sum(p.channels for p in self.gate_points), classifier.num_classes)
        self.register_buffer("class_means", torch.zeros(classifier.num_classes, self.aux.in_features))

    @property
    def channels(self) -> list[int]:
        return [p.channels for p in self.gate_points]

    def input_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The first control module's input: the normalised image, pooled ``(N, C)``."""
        return pool(self.classifier.normalize(x))

    def forward(self, x: torch.Tensor, mode: str = "soft", *, keep_outputs: bool = False
                ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The decoupled network on ``x`` float ``(N, C, H, W)`` in ``[0, 1]``: logits ``(N, K)``, the gates
        per gate point ``(N, C_l)`` (``mode`` ``soft`` or ``hard``) and, with ``keep_outputs``, a dict with
        each gate point's pooled *ungated* positive output (``outputs``: ``pool(relu(out))``, what the channel
        passes on after a ReLU; the output itself at a post-ReLU gate point) and soft gates (``probs``),
        ``(N, C_l)`` each (else an empty dict)."""
        pooled_in = [self.input_pool(x)]
        gates: list[torch.Tensor] = []
        extra: dict[str, list[torch.Tensor]] = {"outputs": [], "probs": []} if keep_outputs else {}

        def gate(i: int, out: torch.Tensor) -> torch.Tensor:
            if len(gates) != i:
                raise ValueError(f"gate point {self.names[i]!r} ran out of order or twice in one pass")
            logit = self.controls[i](pooled_in[i])
            g = gate_values(logit, mode)
            gates.append(g)
            if keep_outputs:
                extra["outputs"].append(pool(torch.relu(out)))
                extra["probs"].append(torch.sigmoid(logit))
            gated = apply_gate(out, g)
            pooled_in.append(pool(gated))
            return gated

        with hooked(self.classifier.net, self.names, gate):
            logits = self.classifier(x)
        return logits, gates, extra

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mode: str = "soft", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, K)`` of the decoupled network and the concatenated gate vector ``(N, sum C_l)``."""
        outs = [self(xb, mode) for xb in x.split(batch_size)]
        return torch.cat([o[0] for o in outs]), torch.cat([torch.cat(o[1], 1) for o in outs])

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """A concatenated gate vector ``(N, sum C_l)`` back into per-gate-point parts."""
        return list(vector.split(self.channels, dim=1))

    # ---- files
    def save(self, path: str | Path, *, training: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None) -> Path:
        """Write ``encoder.safetensors`` and ``encoder.json`` into directory ``path`` (e.g. the guard's)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / ENCODER_TENSORS))
        meta = {"format": ENCODER_FORMAT, "version": ENCODER_VERSION,
                "model": {"name": self.classifier.name, "weights_sha256": weights_fingerprint(self.classifier)},
                "layers": [{"name": p.name, "channels": p.channels} for p in self.gate_points],
                "hidden": self.hidden, "class_names": list(self.classifier.class_names),
                "training": training or {}, "metrics": metrics or {}, "versions": library_versions()}
        (path / ENCODER_META).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, classifier: Classifier, *, check_weights: bool = True) -> "ArchitectureEncoder":
        """Read an encoder written by :meth:`save` for ``classifier``; :class:`~nad_guard.paths.ArtifactError`
        says what is missing or does not fit (format version, classes, gate points, weights fingerprint)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        meta = read_encoder_meta(path)
        path = Path(path)
        if meta.get("class_names") != list(classifier.class_names):
            raise ArtifactError(f"encoder {path} was fitted for classes {meta.get('class_names')}")
        if check_weights and meta.get("model", {}).get("weights_sha256") != weights_fingerprint(classifier):
            raise ArtifactError(f"encoder {path} was fitted for other classifier weights")
        try:
            enc = cls(classifier, [str(d["name"]) for d in meta["layers"]], hidden=meta.get("hidden"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"encoder {path} does not fit the classifier: {e}") from e
        if [int(d["channels"]) for d in meta["layers"]] != enc.channels:
            raise ArtifactError(f"encoder {path}: channel counts differ from the classifier's gate points")
        try:
            enc.load_state_dict(load_file(str(path / ENCODER_TENSORS)), strict=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ArtifactError(f"cannot read {path / ENCODER_TENSORS}: {str(e)[:300]}") from e
        enc.training_meta, enc.metrics_meta = meta.get("training", {}), meta.get("metrics", {})
        return enc.eval()


def read_encoder_meta(path: str | Path) -> dict[str, Any]:
    """``encoder.json`` of a directory, checked to be an encoder of the version this library reads."""
    f = Path(path) / ENCODER_META
    if not f.is_file():
        raise ArtifactError(f"{f} is missing: fit an encoder with `nad-guard fit-encoder --artifact {path}`")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT:
        raise ArtifactError(f"{f} is not a {ENCODER_FORMAT} file")
    if meta.get("version") != ENCODER_VERSION:
        raise ArtifactError(f"{f} has version {meta.get('version')!r}; this library reads {ENCODER_VERSION}")
    return meta
