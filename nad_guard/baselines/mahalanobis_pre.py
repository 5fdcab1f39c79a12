"""Mahalanobis with Lee et al.'s input pre-processing, for many noise magnitudes in one go.

Lee et al. (NeurIPS 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", Eq. 4) move each input a small step against the gradient of its Mahalanobis
distance to the closest class mean, ``x' = x - eps * sign(grad_x d_l(x))``, separately for each layer
``l``, and score ``d_l(x')``: an in-distribution input's distance drops more than an adversarial's, so
the step widens the gap. Their released code (``lib_generation.get_Mahalanobis_score_adv``) computes
it for every magnitude of :data:`LEE_NOISE` and keeps, per attack, the magnitude whose logistic
regression over the layers scores best on held-out "validation" data.

:func:`preprocessed_distances` computes all magnitudes at once: the gradient's sign does not depend on
the magnitude, so each layer costs one forward and one backward pass for the gradient plus one forward
pass of the ``M`` moved copies (batched), i.e. ``L x (1 forward + 1 backward + M forwards)`` per image
for ``L`` layers and ``M`` non-zero magnitudes; magnitude 0 is read from the first forward pass.

Differences from their code: the moved input is clipped to ``[0, 1]`` (theirs is not clipped; with
magnitudes <= 0.01 this touches only saturated pixels); the step is in ``[0, 1]`` pixel units, as is
theirs (their sign step is divided by the normalisation's standard deviation in normalised space).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from nad_guard.baselines.features import default_layers
from nad_guard.baselines.mahalanobis import Mahalanobis
from nad_guard.hooks import capture

LEE_NOISE = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)
"""The noise magnitudes of Lee et al.'s released code (``ADV_Generate_LID_Mahalanobis.py``), in
``[0, 1]`` pixel units."""


def stage_layers(model: nn.Module) -> list[str]:
    """The layers Lee et al. read: the stem and the output of each stage (their ResNet-34's
    ``feature_list``: the first ReLU and ``layer1`` ... ``layer4``). For the CIFAR ResNet-20 that is
    ``net.relu`` and the last block of each of its three stages; for torchvision ResNets
    ``layer1`` ... ``layer4``; otherwise :func:`default_layers`."""
    from nad_guard.models import CifarResNet

    net = getattr(model, "net", model)
    prefix = "net." if net is not model else ""
    if isinstance(net, CifarResNet):
        last = len(net.layer1) - 1
        return [prefix + "relu"] + [f"{prefix}layer{i}.{last}" for i in (1, 2, 3)]
    return default_layers(model)


def preprocessed_distances(model: nn.Module, maha: Mahalanobis, x: torch.Tensor,
                           magnitudes: Sequence[float] = LEE_NOISE) -> np.ndarray:
    """``(B, M * L)`` float64: for each of ``magnitudes`` (outer) and each of ``maha``'s fitted layers
    (inner), the smallest Mahalanobis distance to a class mean at that layer, read at ``x`` moved by
    the magnitude against the sign of that layer's distance gradient (clipped to ``[0, 1]``).

    ``x``: a float batch ``(B, C, H, W)`` in ``[0, 1]`` on ``model``'s device; ``maha``: fitted
    (its Gaussians), ``model`` in eval mode."""
    mags = [float(m) for m in magnitudes]
    if not mags or any(m < 0 for m in mags):
        raise ValueError(f"magnitudes must be a non-empty list of numbers >= 0, got {list(magnitudes)}")
    moved = [m for m in mags if m > 0]
    out = np.empty((len(x), len(mags), len(maha.layers_)))
    for j, n in enumerate(maha.layers_):
        xg = x.detach().clone().requires_grad_(True)
        with capture(model, [n], detach=False) as store, torch.enable_grad():
            model(xg)
            d0 = maha.min_distance(store[n].double(), n)
            (grad,) = torch.autograd.grad(d0.sum(), xg)
        by_mag = {0.0: d0.detach()}
        if moved:
            step = grad.sign()
            xs = torch.cat([(x - m * step).clamp(0, 1) for m in moved])
            with capture(model, [n]) as store, torch.no_grad():
                model(xs)
                d = maha.min_distance(store[n].double(), n).view(len(moved), len(x))
            by_mag.update(zip(moved, d))
        for i, m in enumerate(mags):
            out[:, i, j] = by_mag[m].cpu().numpy()
    return out.reshape(len(x), -1)


def magnitude_block(columns: np.ndarray, magnitudes: Sequence[float], magnitude: float) -> np.ndarray:
    """The ``(N, L)`` per-layer distances of one ``magnitude`` from :func:`preprocessed_distances`'
    ``(N, M * L)`` columns computed with ``magnitudes``."""
    mags = [float(m) for m in magnitudes]
    if columns.shape[1] % len(mags):
        raise ValueError(f"{columns.shape[1]} columns do not split into {len(mags)} magnitudes")
    n_layers = columns.shape[1] // len(mags)
    i = mags.index(float(magnitude))
    return columns[:, i * n_layers:(i + 1) * n_layers]
