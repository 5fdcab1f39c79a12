"""Which images a guard's detector learns from, which set its threshold, and which judge it.

A held-out (test) set is split, seeded and stratified, into ``fit`` / ``calibration`` / ``evaluation``
parts (40/20/40, :func:`holdout_splits`), optionally after a seeded stratified sample
(:func:`sample_heldout`); :func:`holdout_provenance` also returns the record of those parts that the
guard stores (:mod:`nad_guard.provenance`). Detectors only ever see correctly classified clean images
as "clean" (:func:`correct_subset`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nad_guard.data import ImageSet, sample_size, stratified_split
from nad_guard.paths import PathModel
from nad_guard.provenance import PARTS, make_record


def correct_mask(paths: PathModel, images: ImageSet, batch_size: int = 256) -> torch.Tensor:
    """``(N,)`` bool: whether the classifier labels each image correctly."""
    device = next(paths.classifier.parameters()).device
    keep = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            pred = paths.classifier(images.float(s, s + batch_size).to(device)).argmax(1).cpu()
            keep.append(pred == images.labels[s:s + batch_size])
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)


def partition_correct(paths: PathModel, images: ImageSet, batch_size: int = 256) -> tuple[ImageSet, ImageSet]:
    """``(correct, wrong)``: the images the classifier labels correctly, and those it gets wrong."""
    ok = correct_mask(paths, images, batch_size)
    return (images.subset(ok.nonzero().flatten(), f"{images.name}[correct]"),
            images.subset((~ok).nonzero().flatten(), f"{images.name}[mispredicted]"))


def correct_subset(paths: PathModel, images: ImageSet, batch_size: int = 256) -> ImageSet:
    """The images the classifier labels correctly (the only clean images detectors see)."""
    return partition_correct(paths, images, batch_size)[0]


HOLDOUT_FRACTIONS = (0.4, 0.2, 0.4)


def sample_heldout(test: ImageSet, max_images: int | None, seed: int = 0) -> tuple[ImageSet, np.ndarray]:
    """A seeded stratified sample of ``max_images`` images of a held-out set, named ``<name>[<max_images>]``,
    and its sorted positions in ``test``; all of ``test`` when ``max_images`` is ``None`` or not smaller
    (larger: a :class:`~nad_guard.data.SampleSizeNotice` says so).
    ``nad-guard evaluate``, ``fit-detector`` and ``audit`` draw the same sample for the same arguments,
    so attacks cached by one are reused by the others and the audit knows which images a detector saw."""
    if sample_size(max_images, test, "test split") is None:
        return test, np.arange(len(test))
    _, keep = stratified_split(test.labels.numpy(), max_images, seed=seed)
    return test.subset(keep, f"{test.name}[{max_images}]"), keep


def holdout_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(fit, calibration, evaluation)`` of :func:`holdout_splits`'s parts for a held-out set
    with ``labels`` ``(N,)``: seeded, stratified, 40/20/40, each sorted."""
    labels = np.asarray(labels)
    rest, evaluation = stratified_split(labels, test_size=int(round(len(labels) * HOLDOUT_FRACTIONS[2])), seed=seed)
    fit_pos, cal_pos = stratified_split(labels[rest], test_size=int(round(len(labels) * HOLDOUT_FRACTIONS[1])),
                                        seed=seed)
    return rest[fit_pos], rest[cal_pos], evaluation


def holdout_splits(test: ImageSet, seed: int = 0) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Seeded stratified split of a held-out (test) set into ``(fit, calibration, evaluation)`` parts,
    40/20/40 (positions: :func:`holdout_indices`). The detector learns on ``fit`` (clean images and
    their attacks), the threshold is set on ``calibration`` (clean only), and reports that judge the
    guard use ``evaluation``.

    Held-out images, not the classifier's training images, are used to fit the detector: the
    classifier is over-confident on images it was trained on, and a detector fitted on them learns
    that confidence level as "clean" (measured on the tiny digits CNN: AUROC 0.66 on held-out PGD
    when fitted on training images).
    """
    fit, cal, evaluation = holdout_indices(test.labels.numpy(), seed)
    return (test.subset(fit, f"{test.name}[detector-fit]"), test.subset(cal, f"{test.name}[calibration]"),
            test.subset(evaluation, f"{test.name}[evaluation]"))


def holdout_provenance(test: ImageSet, data: str, max_images: int | None = None, seed: int = 0
                       ) -> tuple[tuple[ImageSet, ImageSet, ImageSet], dict[str, Any]]:
    """The ``(fit, calibration, evaluation)`` parts of :func:`holdout_splits` of the seeded sample of
    ``test`` (:func:`sample_heldout`), and the provenance record saying which images of ``test`` each
    holds (:mod:`nad_guard.provenance`; ``data`` is the data set's name for :func:`load_dataset`)."""
    sample, positions = sample_heldout(test, max_images, seed)
    indices = holdout_indices(sample.labels.numpy(), seed)
    parts = holdout_splits(sample, seed)
    kind = test.name.rsplit("/", 1)[-1] if "/" in test.name else "test"
    record = make_record(test, data=data, split_kind=kind, parts={p: positions[i] for p, i in zip(PARTS, indices)},
                         seed=seed, fractions=dict(zip(PARTS, HOLDOUT_FRACTIONS)),
                         rule="nad_guard.holdout.holdout_indices (seeded, stratified)",
                         sample=None if len(sample) == len(test) else
                         {"max_images": max_images, "seed": seed, "rule": "nad_guard.holdout.sample_heldout"})
    return parts, record
