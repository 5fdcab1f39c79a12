"""What a guard's detector sees: path features turned into one row per input.

A detector's input row (:func:`encode`), in one of four encodings:

``summary``
    :attr:`PathFeatures.X`: the documented per-layer divergence features plus confidence signals.
``rich`` (default)
    ``summary`` plus, per layer and class, ``s_k - s_p``: how much better class ``k``'s
    sub-architecture matches the input's path than the predicted class's (``L * K`` columns, all
    ``<= 0`` when the path agrees with the prediction everywhere).
``full``
    ``rich`` plus the path itself, per gate point: ``log(||a||_2 + 1e-12)`` of the absolute pooled
    activation ``a = |pool(out)|`` (its strength, 1 column) and its direction ``a / ||a||_2``
    (``C_l`` columns). It needs the pooled activations of the predicting pass (:func:`features_with_pooled`);
    1 + 352 extra columns per input for the CIFAR ResNet-20's 10 gate points.
``rich+subnet``
    ``rich`` plus the class-subnetwork confidence of Wang, Hu & Su (2019): ``subnet_confidence`` (the
    softmax probability of the predicted class when every gate point's output is masked by that class's
    sub-architecture) and ``subnet_drop`` (``msp - subnet_confidence``), 2 columns. It costs a second
    forward pass (the masked one; :meth:`PathModel.features` with ``subnetwork=True``, or
    :func:`with_subnetwork`), which :func:`detector_inputs` runs when an encoding needs it.

Which is the default, and why (measured on a CIFAR-10 development set: the earlier 87.45% ResNet-20,
1,200 test images split in halves, nine attacks, logistic detector, mean AUROC): the direction columns
of ``full`` moved seen attacks from 0.950 to 0.954, leave-one-out from 0.899 to 0.902 and clean-only
from 0.855 to 0.862, differences within the noise of so small a set, for 353 more columns and a copy
of every pooled activation; ``rich`` is the default. Spatial max-pooled activations as further columns
did not help (seen 0.946-0.954, leave-one-out 0.888-0.906).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from nad_guard.hooks import hooked, pool
from nad_guard.paths import SUBNET_FEATURES, PathFeatures, PathModel, subnetwork_features

ENCODINGS = ("summary", "rich", "full", "rich+subnet")
POOLED_ENCODINGS = ("full",)  # need the pooled gate-point activations (see features_with_pooled)
SUBNET_ENCODINGS = ("rich+subnet",)  # need the class-subnetwork pass (PathModel.features(subnetwork=True))


def needs_subnetwork(encodings: Sequence[str]) -> bool:
    """Whether any of ``encodings`` reads the class-subnetwork pass."""
    return any(e in SUBNET_ENCODINGS for e in encodings)


def encode(f: PathFeatures, encoding: str = "rich", pooled: list[torch.Tensor] | None = None) -> np.ndarray:
    """``(N, F)`` float64 detector input from path features (see the module docstring). ``pooled``
    (per gate point ``(N, C_l)``, from :func:`features_with_pooled`) is needed by the ``full`` encoding only."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    keep = [i for i, n in enumerate(f.names) if n not in SUBNET_FEATURES]  # X is the same with or without them
    cols = [f.X.double()[:, keep]]
    if encoding in ("rich", "full", "rich+subnet"):
        s = f.class_scores.double()  # (N, L, K)
        sp = s.gather(2, f.pred.view(-1, 1, 1).expand(-1, s.shape[1], 1))
        cols.append((s - sp).flatten(1))
    if encoding in SUBNET_ENCODINGS:
        if f.subnet_confidence is None or f.subnet_drop is None:
            raise ValueError(f"encoding {encoding!r} needs the class-subnetwork features (PathModel.features with "
                             "subnetwork=True, or nad_guard.encoding.detector_inputs)")
        cols.append(torch.stack([f.subnet_confidence, f.subnet_drop], 1).double().cpu())
    if encoding in POOLED_ENCODINGS:
        if pooled is None or len(pooled) != len(f.layers):
            raise ValueError(f"encoding {encoding!r} needs the pooled activations of every gate point "
                             "(use nad_guard.encoding.features_with_pooled)")
        for a in pooled:
            a = a.detach().double().cpu().abs()
            norm = a.norm(dim=1, keepdim=True)
            cols += [torch.log(norm + 1e-12), a / norm.clamp_min(1e-12)]
    return torch.cat(cols, 1).numpy()


def features_with_pooled(paths: PathModel, x: torch.Tensor, batch_size: int = 256, subnetwork: bool = False
                         ) -> tuple[PathFeatures, list[torch.Tensor]]:
    """:meth:`PathModel.features` of ``x`` plus the pooled gate-point activations ``(N, C_l)`` (CPU) read
    from the same forward passes (what the ``full`` encoding needs); ``subnetwork``: also the
    class-subnetwork features (a second, masked pass per batch, whose activations are not recorded)."""

    names = paths.layer_names_
    store: list[list[torch.Tensor]] = [[] for _ in names]

    def record(i: int, out: torch.Tensor) -> None:
        store[i].append(pool(out).detach().float().cpu())

    with hooked(paths.classifier.net, names, record):
        f = paths.features(x, batch_size=batch_size)
    return (with_subnetwork(paths, f, x, batch_size) if subnetwork else f), [torch.cat(v) for v in store]


def with_subnetwork(paths: PathModel, f: PathFeatures, x: torch.Tensor, batch_size: int = 256) -> PathFeatures:
    """``f`` (the path features of ``x``) with ``subnet_confidence`` and ``subnet_drop`` filled in from the
    class-subnetwork pass of ``x`` (each input masked by its predicted class's sub-architecture), the same
    numbers as :meth:`PathModel.features` with ``subnetwork=True``; ``f.X`` is left as it is."""
    dev = next(iter(paths.classifier.buffers())).device
    with torch.no_grad():
        logits = [paths.subnetwork_logits(xb.to(dev), pb.to(dev)).cpu()
                  for xb, pb in zip(x.split(batch_size), f.pred.split(batch_size))]
    return replace(f, **subnetwork_features(torch.cat(logits), f.pred, f.msp))


def detector_inputs(paths: PathModel, x: torch.Tensor, encodings: Sequence[str], batch_size: int = 256
                   ) -> tuple[PathFeatures, dict[str, np.ndarray]]:
    """Path features of ``x`` and its detector input in each of ``encodings``, from the same forward
    passes (one per batch)."""
    sub = needs_subnetwork(encodings)
    if any(e in POOLED_ENCODINGS for e in encodings):
        f, pooled = features_with_pooled(paths, x, batch_size, subnetwork=sub)
        return f, {e: encode(f, e, pooled) for e in encodings}
    f = paths.features(x, batch_size=batch_size, subnetwork=sub)
    return f, {e: encode(f, e) for e in encodings}


def detector_input(paths: PathModel, x: torch.Tensor, encoding: str, batch_size: int = 256
                 ) -> tuple[PathFeatures, np.ndarray]:
    """Path features of ``x`` and the detector input in ``encoding`` (one forward pass per batch)."""
    f, m = detector_inputs(paths, x, (encoding,), batch_size)
    return f, m[encoding]
