"""Differentiable stand-ins for the adaptive attack: a smooth surrogate of the detector input
(:func:`soft_encode`) and a scikit-learn scaler + logistic regression as a torch function
(:func:`torch_linear`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from nad_guard.paths import LAYER_FEATURES


def soft_encode(pooled: Sequence[torch.Tensor], logits: torch.Tensor, masks: Sequence[torch.Tensor],
                         stats: Sequence[Any], encoding: str = "rich", *, tau: float = 0.01,
                         top_k: float = 0.25) -> torch.Tensor:
    """A smooth surrogate of :func:`nad_guard.encoding.encode` ``(N, F)`` for attacks.

    Same columns in the same order. The continuous features (``mass_share``, ``margin``, the
    confidence signals and the rich encoding's ``s_k - s_p``) are exact; the step functions are
    replaced: ``nearest_is_pred`` by ``sigmoid(margin / tau)``, ``pred_rank`` by
    ``1 + sum_{k != p} sigmoid((s_k - s_p) / tau)``, ``agree_fraction`` by their mean; ``topk_overlap``
    is the exact value without gradient. The predicted class ``p`` is the current argmax. ``stats``: the
    path model's :class:`~nad_guard.paths.ChannelStats` per gate point.
    """
    from nad_guard.paths import path_features

    parts = path_features(pooled, logits, masks, stats, top_k=top_k)
    s, pred = parts["class_scores"], parts["pred"]
    idx = pred.view(-1, 1, 1).expand(-1, s.shape[1], 1)
    sp = s.gather(2, idx)
    diff = s - sp                                                   # (N, L, K), 0 at k = p
    soft_is_pred = torch.sigmoid(parts["margin"] / tau)
    others = torch.ones_like(s).scatter(2, idx, 0.0)
    soft_rank = 1 + (torch.sigmoid(diff / tau) * others).sum(2)
    per_layer = {"mass_share": parts["mass_share"], "topk_overlap": parts["topk_overlap"].detach(),
                 "margin": parts["margin"], "nearest_is_pred": soft_is_pred, "pred_rank": soft_rank,
                 "centroid_dist": parts["centroid_dist"], "centroid_margin": parts["centroid_margin"]}
    cols = []
    for j in range(s.shape[1]):
        cols += [per_layer[f][:, j] for f in LAYER_FEATURES]
    cols += [soft_is_pred.mean(1), parts["msp"], parts["softmax_margin"], parts["energy"], parts["logit_margin"]]
    out = [torch.stack(cols, 1)]
    if encoding in ("rich", "full"):
        out.append(diff.flatten(1))
    elif encoding != "summary":
        raise ValueError(f"no smooth surrogate for encoding {encoding!r}")
    if encoding == "full":
        for a in pooled:
            a = a.abs()
            norm = a.norm(dim=1, keepdim=True)
            out += [torch.log(norm + 1e-12), a / norm.clamp_min(1e-12)]
    return torch.cat(out, 1)


def _linear(pipeline: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(mean, scale, coef, intercept)`` of a StandardScaler + LogisticRegression pipeline."""
    scaler, lr = pipeline.steps[0][1], pipeline.steps[-1][1]
    return scaler.mean_, scaler.scale_, lr.coef_.ravel(), float(lr.intercept_[0])


def torch_linear(pipeline: Any, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decision function of a StandardScaler + LogisticRegression ``pipeline`` as a differentiable torch
    function of ``(N, F)`` rows."""
    mean, scale, coef, b = _linear(pipeline)
    m, s, w = (torch.as_tensor(v, dtype=dtype, device=device) for v in (mean, scale, coef))
    return lambda x: ((x - m) / s) @ w + b
