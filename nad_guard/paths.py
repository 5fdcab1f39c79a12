"""Class sub-architectures (NAD masks) and how far an input's activated path is from them.

A *gate point* is a module whose output gets one gate per channel. For every class ``k`` a fitted
:class:`PathModel` holds, at each gate point ``l``, a continuous gate vector ``gates_[l][k]`` in
``(0, 1)^C_l`` and the binary mask ``masks_[l][k] = gates_[l][k] > 0.5``: class ``k``'s
sub-architecture (learned by :mod:`training.paths`). At inference the input's *path* is read from the
same single forward pass that predicts: at each gate point the output is pooled to a vector
``a in R^C_l`` (mean over all positions of an ``(N, C, H, W)`` output; a 2-D ``(N, C)`` output is
used as is). Nothing is run twice and no gradient is taken.

Channel statistics (:meth:`PathModel.fit_stats`, from the classifier's correctly classified training
images): per gate point the mean ``mu_c`` and standard deviation ``sigma_c`` of every channel's pooled
activation, and per class ``k`` the *centroid* ``m_k``, the mean standardised path of class ``k``'s
images. The standardised path is ``z_c = (a_c - mu_c) / sigma_c``: how much more (or less) than usual
channel ``c`` fires. Without standardisation a few channels that fire strongly for every input dominate
any comparison of paths (measured on the MNIST CNN: the layer-wise nearest sub-architecture agreed
with the prediction on 19% / 13% / 25% / 94% of correctly classified test images, against 29% / 30% /
77% / 96% standardised).

Features (columns of :attr:`PathFeatures.X`, in this order; ``p`` is the predicted class,
``M_k`` class ``k``'s binary mask at the layer, ``|a|`` the channel-wise absolute pooled activation,
which equals ``a`` after a ReLU):

Per gate point, named ``"<layer>:<feature>"``:

``mass_share``
    ``sum_{c in M_p} |a_c| / sum_c |a_c|`` in ``[0, 1]`` (0 for an all-zero path). Higher: more of
    the activation lies inside the predicted class's sub-architecture.
``topk_overlap``
    Share of the input's most unusually active channels that lie in ``M_p``, in ``[0, 1]``. Those
    channels are the ones with ``z_c`` at least the ``ceil(top_k * C_l)``-th largest value (ties
    included, so the set does not depend on tie-breaking).
``margin``
    ``s_p - max_{k != p} s_k``, where the class score ``s_k = mean_{c in M_k} z_c - mean_{c not in M_k} z_c``
    (a mean over an empty set is 0) says how much more the channels of class ``k``'s sub-architecture
    fire than the rest, in standard deviations. Positive: the predicted class's sub-architecture
    matches the path better than any other.
``nearest_is_pred``
    1.0 if the nearest class ``argmax_k s_k`` (lowest index on ties) is ``p``, else 0.0.
``pred_rank``
    ``1 + #{k : s_k > s_p}``, in ``1..K``; 1 means no class matches the path better than ``p``.
``centroid_dist``
    ``sqrt(mean_c (z_c - m_{p,c})^2)``: root-mean-square distance, in standard deviations, between the
    path and the predicted class's typical path. Higher: the input does not flow like the class's images.
``centroid_margin``
    ``centroid_dist - min_k sqrt(mean_c (z_c - m_{k,c})^2)`` (``>= 0``): 0 when the predicted class's
    typical path is the nearest one.

Global:

``agree_fraction``
    Mean of ``nearest_is_pred`` over gate points, in ``[0, 1]``.
``msp``
    Maximum softmax probability, in ``(0, 1]``; higher is more confident.
``softmax_margin``
    Top-1 minus top-2 softmax probability, in ``[0, 1]``; higher is more confident.
``energy``
    ``-logsumexp(logits)``; *lower* is more confident (Liu et al. 2020).
``logit_margin``
    Top-1 minus top-2 logit, ``>= 0``; higher is more confident (unlike ``softmax_margin`` it does not
    saturate for confident inputs).

Only with ``subnetwork=True`` (a second pass in which every gate point's output is multiplied by
``M_p``: the predicted class's subnetwork, Wang, Hu & Su 2019):

``subnet_confidence``
    Softmax probability of ``p`` under the subnetwork, in ``[0, 1]``.
``subnet_drop``
    ``msp - subnet_confidence``; positive when the input loses confidence inside its own
    class's subnetwork.

The whole-path similarity of class ``k`` (:func:`path_similarity`) is the mean of ``s_k`` over gate
points; the input's *nearest sub-architecture* is its argmax.

Every feature of sample ``i`` depends on sample ``i`` only: no batch statistics. The feature math
is the pure, differentiable function :func:`path_features` of ``(pooled activations, logits,
masks, statistics)``; :meth:`PathModel.pooled_forward` gives those inputs with gradients when called
outside ``torch.no_grad``.

Artifacts: :meth:`PathModel.save` writes a directory with ``meta.json`` (format, version, model
reference, layers, class names, training config and metrics, library versions, and a ``detector``
key reserved for a detector saved later into the same directory) and ``paths.safetensors``
(``gates/<layer>`` float32 ``(K, C_l)``, ``masks/<layer>`` bool ``(K, C_l)``, and the statistics
``stats/mean/<layer>``, ``stats/std/<layer>`` float32 ``(C_l,)`` and ``stats/centroids/<layer>``
float32 ``(K, C_l)``). :meth:`PathModel.load` validates all of it against the classifier and raises
:class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from torch import nn

from nad_guard import __version__
from nad_guard.hooks import device_of, hooked, pool, torch_threads
from nad_guard.models import BasicBlock, CifarResNet, Classifier

ARTIFACT_FORMAT = "nad-guard-paths"
ARTIFACT_VERSION = 2  # 2: channel statistics (version 1 artifacts must be refitted)
META_FILE, TENSOR_FILE = "meta.json", "paths.safetensors"
SPEC_KEYS = ("channels", "height", "width", "mean", "std")

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardtanh)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
LAYER_FEATURES = ("mass_share", "topk_overlap", "margin", "nearest_is_pred", "pred_rank", "centroid_dist",
                  "centroid_margin")
GLOBAL_FEATURES = ("agree_fraction", "msp", "softmax_margin", "energy", "logit_margin")
SUBNET_FEATURES = ("subnet_confidence", "subnet_drop")


class ArtifactError(ValueError):
    """A saved path artifact is missing, corrupt, or does not fit the classifier."""


# --------------------------------------------------------------------------- gate points

@dataclass(frozen=True)
class GatePoint:
    """A module (named as in ``net.named_modules()``) whose output gets one gate per channel."""

    name: str
    channels: int


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one gate point's pooled activations over clean training images (see the module
    docstring): ``mean`` and ``std`` ``(C,)``; ``centroids`` ``(K, C)``, class ``k``'s mean standardised path."""

    mean: torch.Tensor
    std: torch.Tensor
    centroids: torch.Tensor

    def to(self, device: torch.device | str) -> "ChannelStats":
        return ChannelStats(self.mean.to(device), self.std.to(device), self.centroids.to(device))


def _unwrap(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[nn.Module, tuple[int, ...]]:
    if isinstance(model, Classifier):
        return model.net, model.spec.shape
    if input_shape is None:
        raise ValueError("input_shape (C, H, W) is needed for a plain nn.Module; a Classifier carries its own")
    return model, tuple(input_shape)


def _trace(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    """One dry forward on zeros: call count and last output of every module, and leaf call order."""
    calls: dict[str, int] = {}
    outputs: dict[str, Any] = {}
    order: list[str] = []
    names = [n for n, _ in net.named_modules()]
    leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}

    def record(i: int, out: Any) -> None:
        calls[names[i]] = calls.get(names[i], 0) + 1
        outputs[names[i]] = out
        if names[i] in leaves:
            order.append(names[i])

    with torch.no_grad(), hooked(net, names, record):
        net(torch.zeros(1, *input_shape, device=device_of(net)))
    return calls, outputs, order


def _auto_names(net: nn.Module, calls: dict[str, int], order: list[str]) -> list[str]:
    """The automatic gate points for ``net`` (see :func:`find_gate_points`)."""
    from torchvision.models import DenseNet, MobileNetV2, ResNet
    from torchvision.models.densenet import _DenseBlock, _Transition
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock as TvBasicBlock
    from torchvision.models.resnet import Bottleneck

    modules = dict(net.named_modules())
    if isinstance(net, (ResNet, CifarResNet)):
        return ["relu"] + [n for n, m in modules.items() if isinstance(m, (TvBasicBlock, Bottleneck, BasicBlock))]
    if isinstance(net, MobileNetV2):
        return [n for n, m in modules.items() if isinstance(m, InvertedResidual)]
    if isinstance(net, DenseNet):
        return [n for n, m in modules.items() if isinstance(m, (_DenseBlock, _Transition))]
    found = []
    for j, name in enumerate(order):
        if not isinstance(modules[name], ACTIVATIONS) or calls[name] != 1 or name in found:
            continue
        prev = [modules[n] for n in order[max(0, j - 2):j]]
        if prev and isinstance(prev[-1], nn.modules.conv._ConvNd):
            found.append(name)
        elif len(prev) == 2 and isinstance(prev[-1], NORMS) and isinstance(prev[0], nn.modules.conv._ConvNd):
            found.append(name)
    return found


def find_gate_points(model: nn.Module, layers: Sequence[str] | None = None, *,
                     input_shape: Sequence[int] | None = None) -> list[GatePoint]:
    """Gate points of ``model`` (a :class:`Classifier`, whose ``.net`` is inspected, or a plain network).

    With ``layers=None`` the points are chosen by architecture: ResNets (torchvision and
    :class:`~nad_guard.models.CifarResNet`): the stem activation ``relu`` and every residual block;
    MobileNetV2: every inverted-residual block; DenseNet: every dense block and transition; any other
    network (VGG, ``nn.Sequential``, custom CNNs): every activation module that directly follows a
    convolution, possibly through a normalisation layer. Blocks are hooked rather than a ReLU module
    that a block calls several times. Otherwise ``layers`` names the modules explicitly.

    Channel counts come from one dry forward of zeros shaped like the model's input (``input_shape``
    ``(C, H, W)`` is required for a plain network). Each point must be called exactly once per forward
    and return a tensor of shape ``(N, C, ...)``.
    """
    net, shape = _unwrap(model, input_shape)
    if isinstance(net, torch.jit.ScriptModule):
        raise ValueError("a TorchScript model cannot be hooked, so its paths cannot be read; wrap the eager "
                         "nn.Module with its weights instead")
    calls, outputs, order = _trace(net, shape)
    auto = _auto_names(net, calls, order)
    if layers is None:
        if not auto:
            raise ValueError(f"found no gate points automatically in {type(net).__name__} (no activation module "
                             "called once right after a convolution); name the layers explicitly")
        names = auto
    else:
        names = list(layers)
        known = dict(net.named_modules())
        examples = ", ".join((auto or list(calls))[:8])
        for name in names:
            if name not in known or name == "":
                raise ValueError(f"no module named {name!r} in {type(net).__name__}; valid names include {examples}")
        if len(set(names)) != len(names):
            raise ValueError(f"layer names repeat: {names}")
    points = []
    for name in names:
        count, out = calls.get(name, 0), outputs.get(name)
        if count != 1:
            raise ValueError(f"module {name!r} is called {count} times per forward, it needs exactly one call; "
                             "hook the block that contains it instead")
        if not torch.is_tensor(out) or out.ndim < 2:
            raise ValueError(f"module {name!r} does not return a (N, C, ...) tensor, got {type(out).__name__}")
        points.append(GatePoint(name, int(out.shape[1])))
    return points


# --------------------------------------------------------------------------- feature math

def apply_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Multiply ``out`` ``(N, C, ...)`` channel-wise by ``gate`` ``(N, C)``."""
    if out.shape[:2] != gate.shape:
        raise ValueError(f"gate of shape {tuple(gate.shape)} does not fit output {tuple(out.shape)}")
    return out * gate.to(out.dtype).view(*gate.shape, *([1] * (out.ndim - 2)))


@dataclass(frozen=True)
class LayerBasis:
    """The constants :func:`path_features` needs at one gate point, computed once from its masks and
    channel statistics (:func:`feature_basis`): ``mask`` ``(K, C)`` bool; ``mask_t`` ``(C, K)`` 0/1;
    ``score_t`` ``(C, K)``, so that ``z @ score_t`` gives every class score ``s_k`` in one product;
    ``mean``, ``std`` ``(C,)``; ``centroids_t`` ``(C, K)`` and ``centroid_sq`` ``(K,)``. The ``_t``
    matrices are transposed *views* of ``(K, C)`` contiguous ones: with a contiguous ``(C, K)`` operand
    the CPU matmul rounded a row differently depending on the batch's row count (measured), and a
    sample's features must not depend on its batch."""

    mask: torch.Tensor
    mask_t: torch.Tensor
    score_t: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    centroids_t: torch.Tensor
    centroid_sq: torch.Tensor


def feature_basis(masks: Sequence[torch.Tensor], stats: Sequence[ChannelStats],
                  dtype: torch.dtype = torch.float32) -> list[LayerBasis]:
    """Per gate point, the :class:`LayerBasis` of ``masks`` ``(K, C_l)`` and ``stats`` in ``dtype``."""
    out = []
    for m, st in zip(masks, stats, strict=True):
        mb = m.bool()
        mf = mb.to(dtype)
        inside = mf / mf.sum(1, keepdim=True).clamp_min(1)
        outside = (1 - mf) / (1 - mf).sum(1, keepdim=True).clamp_min(1)
        c = st.centroids.to(dtype)
        out.append(LayerBasis(mb, mf.contiguous().T, (inside - outside).contiguous().T, st.mean.to(dtype),
                              st.std.to(dtype), c.contiguous().T, c.pow(2).sum(1)))
    return out


def path_features(pooled: Sequence[torch.Tensor], logits: torch.Tensor, masks: Sequence[torch.Tensor],
                  stats: Sequence[ChannelStats], *, top_k: float = 0.25,
                  basis: Sequence[LayerBasis] | None = None) -> dict[str, torch.Tensor]:
    """The divergence features of the module docstring, as a pure differentiable function.

    Args:
        pooled: per gate point, pooled activations ``(N, C_l)``.
        logits: ``(N, K)`` classifier logits.
        masks: per gate point, the class masks ``(K, C_l)`` (bool or 0/1 float).
        stats: per gate point, the channel statistics.
        top_k: fraction in ``(0, 1]`` of each layer's channels counted as the input's strongest.
        basis: ``feature_basis(masks, stats, dtype)`` computed beforehand (a fitted
            :class:`PathModel` keeps one); computed here when ``None``.

    Returns:
        ``pred`` ``(N,)`` int64; ``class_scores`` ``(N, L, K)`` scores ``s_k`` (standard deviations);
        ``nearest_class`` and ``pred_rank`` ``(N, L)`` int64; ``mass_share``, ``topk_overlap``,
        ``margin``, ``nearest_is_pred``, ``centroid_dist``, ``centroid_margin`` ``(N, L)`` float;
        ``agree_fraction``, ``msp``, ``softmax_margin``, ``energy``, ``logit_margin`` ``(N,)`` float.
        Gradients flow through the continuous ones.
    """
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k must be a fraction in (0, 1], got {top_k}")
    if basis is None:
        basis = feature_basis(masks, stats, pooled[0].dtype if pooled else torch.float32)
    pred = logits.argmax(1)
    col = pred[:, None]
    share, overlap, scores, cdist, cmargin = [], [], [], [], []
    for a, b in zip(pooled, basis, strict=True):
        b_dtype = b.mask_t.dtype
        if a.dtype != b_dtype:
            a = a.to(b_dtype)
        mag = a.abs()
        # mask of the predicted class, gathered from one product with every class's mask
        share.append((mag @ b.mask_t).gather(1, col).squeeze(1) / mag.sum(1).clamp_min(1e-12))
        z = (a - b.mean) / b.std
        kth = z.topk(max(1, math.ceil(top_k * z.shape[1])), dim=1).values[:, -1:]
        strong = (z >= kth).to(b_dtype)
        overlap.append((strong @ b.mask_t).gather(1, col).squeeze(1) / strong.sum(1).clamp_min(1))
        scores.append(z @ b.score_t)
        d2 = z.pow(2).sum(1, keepdim=True) - 2 * (z @ b.centroids_t) + b.centroid_sq  # (N, K) squared distances
        d = (d2 / z.shape[1]).clamp_min(1e-12).sqrt()
        d_pred = d.gather(1, col).squeeze(1)
        cdist.append(d_pred)
        cmargin.append(d_pred - d.amin(1))
    s = torch.stack(scores, 1)  # (N, L, K)
    idx = pred.view(-1, 1, 1).expand(-1, s.shape[1], 1)
    s_pred = s.gather(2, idx).squeeze(2)
    nearest = s.argmax(2)
    is_pred = (nearest == col).to(s.dtype)
    probs = logits.softmax(1)
    top2 = probs.topk(2, dim=1).values
    ltop2 = logits.topk(2, dim=1).values
    return {
        "pred": pred, "class_scores": s, "nearest_class": nearest,
        "pred_rank": 1 + (s > s_pred[..., None]).sum(2),
        "mass_share": torch.stack(share, 1), "topk_overlap": torch.stack(overlap, 1),
        "margin": s_pred - s.scatter(2, idx, float("-inf")).amax(2),
        "nearest_is_pred": is_pred, "centroid_dist": torch.stack(cdist, 1), "centroid_margin": torch.stack(cmargin, 1),
        "agree_fraction": is_pred.mean(1),
        "msp": top2[:, 0], "softmax_margin": top2[:, 0] - top2[:, 1], "energy": -torch.logsumexp(logits, 1),
        "logit_margin": ltop2[:, 0] - ltop2[:, 1],
    }


def subnetwork_features(subnet_logits: torch.Tensor, pred: torch.Tensor, msp: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """``subnet_confidence`` and ``subnet_drop`` ``(N,)`` from the logits of the predicted class's subnetwork."""
    conf = subnet_logits.softmax(1).gather(1, pred[:, None]).squeeze(1)
    return {"subnet_confidence": conf, "subnet_drop": msp - conf}


def feature_matrix(parts: Mapping[str, torch.Tensor], layers: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Stack the outputs of :func:`path_features` (and :func:`subnetwork_features`, if present)
    into ``(N, F)`` float columns and their names, in the module docstring's order."""
    dtype = parts["msp"].dtype
    per_layer = torch.stack([parts[f].to(dtype) for f in LAYER_FEATURES], 2)  # (N, L, F_layer), layer-major
    glob = [f for f in GLOBAL_FEATURES + SUBNET_FEATURES if f in parts]
    X = torch.cat([per_layer.reshape(per_layer.shape[0], -1), torch.stack([parts[f] for f in glob], 1)], 1)
    names = [f"{layer}:{f}" for layer in layers for f in LAYER_FEATURES] + glob
    return X, names


def path_similarity(class_scores: torch.Tensor) -> torch.Tensor:
    """Whole-path similarity ``(N, K)`` from the per-layer class scores ``s_k`` ``(N, L, K)``: the mean over
    gate points of ``s_k`` (standard deviations); higher means class ``k``'s sub-architecture matches the
    input's path better."""
    return class_scores.mean(1)


def mask_similarity(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K, K)`` similarity of class sub-architectures: mean over layers of the Jaccard index of the
    binary masks ``(K, C_l)``; two empty masks have Jaccard index 1."""
    sims = []
    for m in masks:
        m = m.bool().double()
        inter = m @ m.T
        union = m.sum(1)[:, None] + m.sum(1)[None] - inter
        sims.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)))
    return torch.stack(sims).mean(0)


# --------------------------------------------------------------------------- fitted model

@dataclass
class PathFeatures:
    """Features of a batch (CPU tensors; see the module docstring for each quantity).

    ``X`` ``(N, F)`` float32 with column ``names``; ``layers`` the gate points (``L``); ``logits``
    ``(N, K)``; ``pred`` ``(N,)``; per layer ``(N, L)``: ``mass_share``, ``topk_overlap``, ``margin``,
    ``nearest_class``, ``nearest_is_pred``, ``pred_rank``, ``centroid_dist``, ``centroid_margin``;
    ``class_scores`` ``(N, L, K)``;
    ``msp``, ``softmax_margin``, ``energy``, ``logit_margin``, ``agree_fraction`` ``(N,)``; ``subnet_confidence`` and
    ``subnet_drop`` ``(N,)`` or ``None``.
    """

    X: torch.Tensor
    names: list[str]
    layers: list[str]
    logits: torch.Tensor
    pred: torch.Tensor
    mass_share: torch.Tensor
    topk_overlap: torch.Tensor
    margin: torch.Tensor
    class_scores: torch.Tensor
    nearest_class: torch.Tensor
    nearest_is_pred: torch.Tensor
    pred_rank: torch.Tensor
    centroid_dist: torch.Tensor
    centroid_margin: torch.Tensor
    agree_fraction: torch.Tensor
    msp: torch.Tensor
    softmax_margin: torch.Tensor
    energy: torch.Tensor
    logit_margin: torch.Tensor
    subnet_confidence: torch.Tensor | None = None
    subnet_drop: torch.Tensor | None = None

    def rows(self, index: slice) -> "PathFeatures":
        """The features of the rows ``index`` of the batch (every per-input tensor sliced)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    @property
    def path_similarity(self) -> torch.Tensor:
        """``(N, K)``: how well each class's sub-architecture matches the input's whole path (higher =
        nearer); see :func:`path_similarity`."""
        return path_similarity(self.class_scores)

    @property
    def nearest_path_class(self) -> torch.Tensor:
        """``(N,)`` int64: the class whose sub-architecture is nearest the input's whole path (the argmax
        of :attr:`path_similarity`, lowest index on ties)."""
        return self.path_similarity.argmax(1)

    def true_class_rank(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 in ``1..K``: rank of class ``labels[i]``'s sub-architecture among all K by
        :attr:`path_similarity` (1 = nearest; ties counted in the class's favour)."""
        sim = self.path_similarity
        own = sim.gather(1, labels.view(-1, 1).to(sim.device))
        return 1 + (sim > own).sum(1)


class PathModel:
    """Per-class sub-architectures of a frozen classifier and the path-divergence features.

    Args:
        classifier: the frozen :class:`Classifier`; it is never modified.
        layers: gate point names in ``classifier.net`` (``None``: automatic, see :func:`find_gate_points`).

    Learned state (set by :meth:`set_gates`, which :func:`training.paths.fit_paths` and :meth:`load`
    call): ``gate_points_``, ``gates_`` and ``masks_`` (layer name -> ``(K, C_l)`` float in ``(0, 1)``
    / bool), ``class_names_``, ``training_`` (config) and ``metrics_``; and ``stats_`` (layer name ->
    :class:`ChannelStats`), set by :meth:`fit_stats` (or passed to :meth:`set_gates`). Features need both.
    """

    def __init__(self, classifier: Classifier, layers: Sequence[str] | None = None):
        self.classifier = classifier
        self.layers = layers

    def __repr__(self) -> str:
        state = f", {len(self.gate_points_)} gate points" if hasattr(self, "masks_") else ", not fitted"
        return f"PathModel({self.classifier.name!r}{state})"

    # ---- learned state
    def set_gates(self, gates: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None, *,
                  stats: Mapping[str, ChannelStats] | None = None, training: dict[str, Any] | None = None,
                  metrics: dict[str, Any] | None = None) -> "PathModel":
        """Install learned gates (layer name -> ``(K, C_l)`` in ``[0, 1]``); ``masks`` default to
        ``gates > 0.5``; ``stats`` (layer name -> :class:`ChannelStats`) are kept if given, else
        :meth:`fit_stats` must run before features are read. Raises ``ValueError`` if names or shapes do
        not fit the classifier."""
        points = find_gate_points(self.classifier, self.layers)
        names = [p.name for p in points]
        if set(gates) != set(names) or (masks is not None and set(masks) != set(names)):
            raise ValueError(f"gates are for layers {sorted(gates)}, the model's gate points are {names}")
        k = self.classifier.num_classes
        new_gates, new_masks = {}, {}
        for p in points:
            g = gates[p.name].detach().float().cpu()
            m = (g > 0.5) if masks is None else masks[p.name].detach().cpu().bool()
            for what, t in (("gates", g), ("masks", m)):
                if tuple(t.shape) != (k, p.channels):
                    raise ValueError(f"{what} for {p.name!r} have shape {tuple(t.shape)}, expected ({k}, {p.channels})")
            if not torch.isfinite(g).all() or g.min() < 0 or g.max() > 1:
                raise ValueError(f"gates for {p.name!r} must lie in [0, 1]")
            new_gates[p.name], new_masks[p.name] = g, m
        new_stats = None
        if stats is not None:
            if set(stats) != set(names):
                raise ValueError(f"statistics are for layers {sorted(stats)}, the model's gate points are {names}")
            new_stats = {}
            for p in points:
                st = stats[p.name]
                st = ChannelStats(*(t.detach().float().cpu() for t in (st.mean, st.std, st.centroids)))
                if (tuple(st.mean.shape), tuple(st.std.shape), tuple(st.centroids.shape)) != \
                        ((p.channels,), (p.channels,), (k, p.channels)):
                    raise ValueError(f"statistics for {p.name!r} have shapes {tuple(st.mean.shape)}, "
                                     f"{tuple(st.std.shape)}, {tuple(st.centroids.shape)}; expected ({p.channels},), "
                                     f"({p.channels},), ({k}, {p.channels})")
                if not all(torch.isfinite(t).all() for t in (st.mean, st.std, st.centroids)) or st.std.min() <= 0:
                    raise ValueError(f"statistics for {p.name!r} must be finite with positive std")
                new_stats[p.name] = st
        self.gate_points_, self.gates_, self.masks_ = points, new_gates, new_masks
        if new_stats is not None:
            self.stats_ = new_stats
        elif hasattr(self, "stats_"):
            del self.stats_
        self.class_names_ = list(self.classifier.class_names)
        self.training_, self.metrics_ = dict(training or {}), dict(metrics or {})
        return self

    def _check_fitted(self, stats: bool = False) -> None:
        if not hasattr(self, "masks_"):
            raise NotFittedError("this PathModel has no masks yet: fit it with training.paths.fit_paths "
                                 "or load a saved artifact with PathModel.load")
        if stats and not hasattr(self, "stats_"):
            raise NotFittedError("this PathModel has masks but no channel statistics: call "
                                 "fit_stats(training images) before reading features")

    @torch.no_grad()
    def fit_stats(self, images: Any, labels: torch.Tensor | None = None, *, batch_size: int = 256,
                  progress: bool = False) -> "PathModel":
        """Fit the channel statistics (see the module docstring) from clean training images, streamed.

        ``images``: an :class:`~nad_guard.data.ImageSet`, or a float ``(N, C, H, W)`` tensor in ``[0, 1]``
        with ``labels`` ``(N,)``. Means, standard deviations and class centroids are taken over the
        images the classifier labels correctly (all images if it labels none correctly; a class without
        correctly labelled images gets the centroid of all its images). Memory does not grow with N.
        """
        from tqdm.auto import tqdm

        self._check_fitted()
        names, k = self.layer_names_, self.classifier.num_classes
        if labels is None:
            get = lambda s, e: images.float(s, e)  # noqa: E731
            labels = images.labels
        else:
            get = lambda s, e: images[s:e]  # noqa: E731
        n = len(labels)
        if n == 0:
            raise ValueError("fit_stats needs at least one image")
        device = device_of(self.classifier)
        # per layer: [sum, sumsq] over correct and over all rows; per-class sums and counts (correct, all)
        acc = {key: [None] * len(names) for key in ("s_ok", "q_ok", "s_all", "q_all", "c_ok", "c_all")}
        cnt_ok, cnt_all = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        for s in tqdm(range(0, n, batch_size), desc="channel stats", disable=not progress, leave=False):
            x, y = get(s, s + batch_size).to(device), labels[s:s + batch_size].to(device)
            logits, pooled = self.pooled_forward(x)
            ok = (logits.argmax(1) == y).double()
            onehot = F.one_hot(y, k).double()
            cnt_ok += (onehot * ok[:, None]).sum(0).cpu()
            cnt_all += onehot.sum(0).cpu()
            for i, a in enumerate(pooled):
                a = a.double()
                for key, val in (("s_ok", (a * ok[:, None]).sum(0)), ("q_ok", (a * a * ok[:, None]).sum(0)),
                                 ("s_all", a.sum(0)), ("q_all", (a * a).sum(0)),
                                 ("c_ok", (onehot * ok[:, None]).T @ a), ("c_all", onehot.T @ a)):
                    val = val.cpu()
                    acc[key][i] = val if acc[key][i] is None else acc[key][i] + val
        use_ok = cnt_ok.sum() > 0
        total = cnt_ok.sum() if use_ok else cnt_all.sum()
        stats = {}
        for i, name in enumerate(names):
            mean = (acc["s_ok"][i] if use_ok else acc["s_all"][i]) / total
            var = ((acc["q_ok"][i] if use_ok else acc["q_all"][i]) / total - mean ** 2).clamp_min(0)
            std = var.sqrt()
            std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
            class_mean = torch.where((cnt_ok > 0)[:, None], acc["c_ok"][i] / cnt_ok.clamp_min(1)[:, None],
                                     acc["c_all"][i] / cnt_all.clamp_min(1)[:, None])
            centroids = torch.where((cnt_all > 0)[:, None], (class_mean - mean) / std, torch.zeros_like(class_mean))
            stats[name] = ChannelStats(mean.float(), std.float(), centroids.float())
        self.stats_ = stats
        self.metrics_ = {**self.metrics_, "stats_images": int(total), "stats_from": "correct" if use_ok else "all",
                         "stats_classes_without_images": [self.class_names_[j] for j in range(k) if cnt_all[j] == 0]}
        return self

    @property
    def layer_names_(self) -> list[str]:
        self._check_fitted()
        return [p.name for p in self.gate_points_]

    def kept_fraction(self) -> torch.Tensor:
        """``(L, K)``: share of each layer's channels in each class's mask."""
        self._check_fitted()
        return torch.stack([self.masks_[n].float().mean(1) for n in self.layer_names_])

    def similarity(self) -> torch.Tensor:
        """``(K, K)`` class sub-architecture similarity, see :func:`mask_similarity`."""
        self._check_fitted()
        return mask_similarity([self.masks_[n] for n in self.layer_names_])

    def _feature_basis(self, device: torch.device, dtype: torch.dtype) -> list[LayerBasis]:
        """:func:`feature_basis` of the learned masks and statistics, kept until they are replaced
        (the cache holds the very tensors it was computed from and is checked against them)."""
        names = self.layer_names_
        source = [self.masks_[n] for n in names] + [t for n in names for t in
                                                     (self.stats_[n].mean, self.stats_[n].std, self.stats_[n].centroids)]
        key = (str(device), dtype)
        cached = getattr(self, "_basis_cache", None)
        if cached is not None and cached[0] == key and len(cached[1]) == len(source) and all(
                a is b for a, b in zip(cached[1], source)):
            return cached[2]
        basis = feature_basis([self.masks_[n].to(device) for n in names], [self.stats_[n].to(device) for n in names],
                              dtype)
        self._basis_cache = (key, source, basis)
        return basis

    # ---- forward passes
    def pooled_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass: logits ``(N, K)`` and pooled activations per gate point ``(N, C_l)``.

        ``x`` float ``(N, C, H, W)`` in ``[0, 1]`` on the classifier's device. Gradients flow when
        called outside ``torch.no_grad`` (e.g. for adaptive attacks).
        """
        names = self.layer_names_
        pooled: list[torch.Tensor | None] = [None] * len(names)

        def record(i: int, out: torch.Tensor) -> None:
            pooled[i] = pool(out)

        with hooked(self.classifier.net, names, record):
            logits = self.classifier(x)
        return logits, pooled  # type: ignore[return-value]

    def subnetwork_logits(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` with sample ``i``'s gate point outputs multiplied by the binary mask of
        class ``classes[i]`` (its class subnetwork)."""
        names = self.layer_names_
        masks = [self.masks_[n].to(x.device)[classes.to(x.device)] for n in names]
        with hooked(self.classifier.net, names, lambda i, out: apply_gate(out, masks[i])):
            return self.classifier(x)

    def features(self, x: torch.Tensor, *, top_k: float = 0.25, subnetwork: bool = False,
                 batch_size: int = 256) -> PathFeatures:
        """Path-divergence features of ``x`` float ``(N, C, H, W)`` in ``[0, 1]``.

        One forward pass per batch of ``batch_size`` under ``torch.no_grad`` (two with
        ``subnetwork=True``). Sample ``i``'s features do not depend on the rest of the batch. On CPU the
        feature arithmetic after each pass runs on one torch thread (:func:`torch_threads`).
        """
        self._check_fitted(stats=True)
        self.classifier.check_input(x)
        names = self.layer_names_
        device = device_of(self.classifier)
        masks = [self.masks_[n].to(device) for n in names]
        stats = [self.stats_[n].to(device) for n in names]
        chunks: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for xb in x.split(batch_size):
                xb = xb.to(device)
                logits, pooled = self.pooled_forward(xb)
                with torch_threads(1) if device.type == "cpu" else nullcontext():
                    parts = path_features(pooled, logits, masks, stats, top_k=top_k,
                                          basis=self._feature_basis(device, pooled[0].dtype))
                if subnetwork:
                    parts |= subnetwork_features(self.subnetwork_logits(xb, parts["pred"]), parts["pred"],
                                                 parts["msp"])
                parts["logits"] = logits
                chunks.append({k: v.cpu() for k, v in parts.items()})
        parts = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        X, feature_names = feature_matrix(parts, names)
        known = {f.name for f in fields(PathFeatures)}
        return PathFeatures(X=X.float(), names=feature_names, layers=names,
                            **{k: v for k, v in parts.items() if k in known})

    # ---- artifacts
    def save(self, path: str | Path) -> Path:
        """Write ``meta.json`` and ``paths.safetensors`` into directory ``path`` (created if needed).

        ``meta["detector"]`` is reset to ``None``: a detector trained on the old paths no longer fits.
        """
        from safetensors.torch import save_file

        self._check_fitted(stats=True)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n in self.layer_names_:
            tensors[f"gates/{n}"] = self.gates_[n].contiguous()
            tensors[f"masks/{n}"] = self.masks_[n].contiguous()
            st = self.stats_[n]
            tensors[f"stats/mean/{n}"] = st.mean.contiguous()
            tensors[f"stats/std/{n}"] = st.std.contiguous()
            tensors[f"stats/centroids/{n}"] = st.centroids.contiguous()
        save_file(tensors, str(path / TENSOR_FILE))
        meta = {
            "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
            "model": {"name": self.classifier.name, "input_spec": self.classifier.spec.to_dict(),
                      "weights_sha256": weights_fingerprint(self.classifier)},
            "layers": [{"name": p.name, "channels": p.channels} for p in self.gate_points_],
            "class_names": self.class_names_, "training": self.training_, "metrics": self.metrics_,
            "versions": library_versions(), "detector": None,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, classifier: Classifier, *, check_weights: bool = True) -> "PathModel":
        """Load an artifact written by :meth:`save` for ``classifier``.

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
        try:
            return cls(classifier, [n for n, _ in layers]).set_gates(
                gates, masks, stats=stats, training=meta.get("training"), metrics=meta.get("metrics"))
        except ValueError as e:
            raise ArtifactError(f"artifact {path} does not fit the classifier: {e}") from e


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
