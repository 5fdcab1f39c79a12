"""What the detectors read from each image set of a run: :class:`FeatureSet` (path encodings, the baselines'
pooled activations and the labels, from one forward pass per batch: :func:`compute_features`), and
:class:`FeatureKey`, the name of each set in a run's feature store (which holdout part, which images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from nad_guard.baselines import Features
from nad_guard.data import ImageSet
from nad_guard.encoding import encode, features_with_pooled, needs_subnetwork, with_subnetwork
from nad_guard.hooks import capture
from nad_guard.paths import PathModel

PARTS = ("fit", "calibration", "evaluation")
CLEAN, WRONG = "clean", "wrong"


@dataclass(frozen=True)
class FeatureKey:
    """The name of one image set of a run, and of its :class:`FeatureSet` in :attr:`EvalData.features`.

    ``part``: the holdout part, ``"fit"`` (detector-fit), ``"calibration"`` or ``"evaluation"``.
    ``kind``: ``"clean"`` (the part's correctly classified images), ``"wrong"`` (its misclassified
    images, the natural mispredictions), an attack's name (that attack's successful adversarials of
    the part's clean images; a noise control's: every noisy copy) or, for the negatives of a run with
    noisy negatives, ``"clean+<control>[+<control>...]"`` (:meth:`negatives`). Printed as ``part:kind``.
    """

    part: str
    kind: str

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")

    @classmethod
    def attack(cls, part: str, attack: str) -> "FeatureKey":
        """The successful adversarials of ``attack`` on ``part``'s clean images."""
        if attack in (CLEAN, WRONG):
            raise ValueError(f"{attack!r} names no attack")
        return cls(part, attack)

    @classmethod
    def negatives(cls, part: str, noisy: Sequence[str] = ()) -> "FeatureKey":
        """The negatives of ``part``: its clean images, followed by the noisy copies of each of ``noisy``
        (noise controls counted as negatives, ``EvalConfig.noisy_negatives``) when there are any."""
        return cls(part, "+".join([CLEAN, *noisy]))

    def __str__(self) -> str:
        return f"{self.part}:{self.kind}"


FIT_CLEAN = FeatureKey("fit", CLEAN)
FIT_WRONG = FeatureKey("fit", WRONG)
CALIBRATION_CLEAN = FeatureKey("calibration", CLEAN)
EVALUATION_CLEAN = FeatureKey("evaluation", CLEAN)
EVALUATION_WRONG = FeatureKey("evaluation", WRONG)


@dataclass
class FeatureSet:
    """Everything the detectors read from one image set (one forward pass per batch)."""

    path: dict[str, np.ndarray]   # encoding -> (N, F) detector input
    base: Features                 # baselines' pooled activations and logits
    labels: np.ndarray             # (N,) true labels
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, F) columns read from the images

    def __len__(self) -> int:
        return len(self.labels)


def compute_features(paths: PathModel, images: torch.Tensor | ImageSet, labels: Any, encodings: Sequence[str],
                     layers: Sequence[str], batch_size: int = 128, progress: bool = False,
                     desc: str = "features",
                     image_columns: Mapping[str, Callable[[torch.Tensor], np.ndarray]] | None = None) -> FeatureSet:
    """Path encodings and baseline features of ``images`` (float ``(N, C, H, W)`` in ``[0, 1]``, or an
    :class:`ImageSet`, converted to float one batch at a time), streamed in batches: the memory of
    the passes is bounded by ``batch_size``; what is kept is ``O(N)`` per-image feature rows.

    ``image_columns``: further per-image columns that need the images themselves (multi-pass detectors:
    the deep check's probes, feature squeezing, input pre-processing), ``name -> fn``, where ``fn`` takes a
    batch ``(B, C, H, W)`` on the classifier's device and returns ``(B, F)`` (or ``(B,)``) numbers; kept in
    :attr:`FeatureSet.extra` as float64 ``(N, F)``."""
    from tqdm.auto import tqdm

    clf = paths.classifier
    device = next(iter(clf.buffers())).device
    enc: dict[str, list[np.ndarray]] = {e: [] for e in encodings}
    acts: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    logits = []
    extra: dict[str, list[np.ndarray]] = {n: [] for n in (image_columns or {})}
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = images.float(s, s + batch_size) if isinstance(images, ImageSet) else images[s:s + batch_size]
        with capture(clf, layers) as store:  # hooked for the predicting pass only: the columns run their own
            f, pooled = features_with_pooled(paths, x.to(device), batch_size=batch_size)
            for n in layers:
                acts[n].append(store[n].cpu().numpy())
        if needs_subnetwork(encodings):
            f = with_subnetwork(paths, f, x, batch_size)
        for e in encodings:
            enc[e].append(encode(f, e, pooled))
        logits.append(f.logits.float().numpy())
        for n, fn in (image_columns or {}).items():
            col = np.asarray(fn(x.to(device)), dtype=np.float64)
            extra[n].append(col.reshape(len(x), -1))
    if not logits:
        raise ValueError(f"{desc}: no images")
    return FeatureSet({e: np.concatenate(v) for e, v in enc.items()},
                      Features({n: np.concatenate(v) for n, v in acts.items()}, np.concatenate(logits)),
                      np.asarray(labels, dtype=np.int64), {n: np.concatenate(v) for n, v in extra.items()})


def concat_feature_sets(sets: Sequence[FeatureSet]) -> FeatureSet:
    """The rows of ``sets``, in order, as one :class:`FeatureSet`."""
    return FeatureSet({e: np.concatenate([s.path[e] for s in sets]) for e in sets[0].path},
                      Features.concat([s.base for s in sets]), np.concatenate([s.labels for s in sets]),
                      {n: np.concatenate([s.extra[n] for s in sets]) for n in sets[0].extra})
