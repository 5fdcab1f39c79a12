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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Mapping, Sequence

import torch

LAYER_FEATURES = ("mass_share", "topk_overlap", "margin", "nearest_is_pred", "pred_rank", "centroid_dist",
                  "centroid_margin")
GLOBAL_FEATURES = ("agree_fraction", "msp", "softmax_margin", "energy", "logit_margin")
SUBNET_FEATURES = ("subnet_confidence", "subnet_drop")


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one gate point's pooled activations over clean training images (see the module
    docstring): ``mean`` and ``std`` ``(C,)``; ``centroids`` ``(K, C)``, class ``k``'s mean standardised path."""

    mean: torch.Tensor
    std: torch.Tensor
    centroids: torch.Tensor

    def to(self, device: torch.device | str) -> "ChannelStats":
        return ChannelStats(self.mean.to(device), self.std.to(device), self.centroids.to(device))


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
