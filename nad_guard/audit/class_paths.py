"""Class paths, the thing the audit's claims compare classes by, and NAD's own test of them.

A *class-path source* gives, at every gate point, one vector per class over the layer's channels: the
binary NAD masks of the guard's :class:`~nad_guard.paths.PathModel` (:func:`class_paths_from_masks`) and,
when the audit is given one, an NND architecture encoder's class-average soft gates (values in ``[0, 1]``,
:func:`class_paths_from_encoder`); :func:`class_path_sources` lists them, the masks first. The similarity
of two classes is the mean over gate points of the weighted Jaccard index
``sum_c min(u_c, v_c) / sum_c max(u_c, v_c)`` of their vectors, which for binary masks is the plain Jaccard
index of :meth:`PathModel.similarity <nad_guard.paths.PathModel.similarity>`.

NAD's test (:func:`k_similar_test`): for a misprediction of true class ``t`` as ``p``, rank the other
``K - 1`` classes by their similarity to ``t`` (1 = most similar); NAD claims ``p`` is among the ``k``
most similar. Ties are broken at random (seeded), so that under the null hypothesis (``p`` drawn
uniformly from the other classes) a hit has probability exactly ``k / (K - 1)``: the count of hits is
binomial, tested one-sided (``scipy.stats.binomtest``, alternative "greater") with a Wilson interval,
overall and per true class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

KS = (1, 3)  # the k of NAD's test: the predicted class among the true class's k most similar
ENCODER_SOURCE = "nnd-encoder"  # the name of the encoder's class-path source


@dataclass
class ClassPaths:
    """One source of class paths: ``vectors[l]`` ``(K, C_l)`` float in ``[0, 1]`` at gate point ``layers[l]``."""

    name: str
    description: str
    layers: list[str]
    vectors: list[np.ndarray]
    images_per_class: list[int] | None = None  # how many images each class's vector averages (None: not an average)

    def similarity(self) -> np.ndarray:
        """``(K, K)``: mean over gate points of the weighted Jaccard index of the classes' vectors (two
        all-zero vectors have index 1)."""
        sims = []
        for v in self.vectors:
            v = np.asarray(v, dtype=np.float64)
            lo = np.minimum(v[:, None, :], v[None, :, :]).sum(2)
            hi = np.maximum(v[:, None, :], v[None, :, :]).sum(2)
            sims.append(np.divide(lo, hi, out=np.ones_like(lo), where=hi > 0))
        return np.mean(sims, axis=0)


def class_paths_from_masks(paths: Any) -> ClassPaths:
    """The NAD masks of a fitted :class:`~nad_guard.paths.PathModel` as a class-path source."""
    names = paths.layer_names_
    return ClassPaths("masks", "NAD sub-architectures: the binary class masks learned by fit-paths", list(names),
                      [paths.masks_[n].numpy().astype(np.float64) for n in names])


@torch.no_grad()
def class_paths_from_encoder(encoder: Any, images: torch.Tensor, labels: torch.Tensor | np.ndarray,
                             guard_layers: Sequence[str] | None = None, batch_size: int = 256) -> ClassPaths:
    """An NND architecture encoder's (:class:`~nad_guard.encoder.ArchitectureEncoder`) class paths: at each of
    the *encoder's own* gate points, class ``k``'s vector is the mean of the encoder's soft gates (the encoding
    :meth:`~nad_guard.encoder.ArchitectureEncoder.encode` gives, in ``(0, 1)``) over the images of ``images``
    (``uint8`` ``(N, C, H, W)``, read in batches of ``batch_size``) whose label is ``k``. A class without
    images gets the all-zero vector (weighted Jaccard 0 with any other class); ``images_per_class`` says how many
    each class had.

    Which images (the audit, :func:`nad_guard.audit.claims.claims_pass`): the audited images the classifier
    predicts correctly, by their true class. The audit holds no training images (it loads only the audited
    split), and correctly classified images hold none of the mispredictions that NAD's test and the confusion
    matrix are then measured on, so the class similarity is not built from the errors it is tested against;
    being the easier images of each class, if anything they make confused classes look less alike. (The
    encoder file's own ``class_means``, over its training images by prediction, are not used: the audit's
    figures should come from images it can name.) ``guard_layers``: the guard's gate points, only to say in
    the description whether the encoder's are the same."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = encoder.classifier.num_classes
    dev = encoder.class_means.device
    sums = torch.zeros(k, sum(encoder.channels), dtype=torch.float64, device=dev)
    for s in range(0, len(images), batch_size):
        _, g = encoder.encode(images[s:s + batch_size].to(dev).float().div_(255.0), "soft", batch_size)
        sums.index_add_(0, labels[s:s + batch_size].to(dev), g.double())
    counts = torch.bincount(labels, minlength=k).to(dev)
    means = (sums / counts.clamp_min(1)[:, None]).cpu()
    where = ("the guard's gate points" if guard_layers is not None and list(guard_layers) == list(encoder.names)
             else "the encoder's own gate points" + (" (not the guard's)" if guard_layers is not None else ""))
    return ClassPaths(ENCODER_SOURCE, f"NND architecture encoder: each class's mean soft gate vector over the "
                      f"correctly classified audited images of that class ({int(counts.sum())} images), at {where}",
                      list(encoder.names), [v.numpy() for v in encoder.split(means)],
                      [int(c) for c in counts.cpu()])


def class_path_sources(guard: Any, encoder: Any = None, images: torch.Tensor | None = None,
                       labels: torch.Tensor | np.ndarray | None = None, batch_size: int = 256) -> list[ClassPaths]:
    """Every class-path source of the audit: the guard's masks first, then, with an ``encoder``, its class
    averages over ``images`` of class ``labels`` (:func:`class_paths_from_encoder`)."""
    sources = [class_paths_from_masks(guard.paths)]
    if encoder is not None:
        if images is None or labels is None:
            raise ValueError("an encoder's class paths need the images and labels they average over")
        sources.append(class_paths_from_encoder(encoder, images, labels, guard.paths.layer_names_, batch_size))
    return sources


def similar_ranks(similarity: np.ndarray, labels: np.ndarray, preds: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(N,)`` int64: rank ``1..K-1`` of ``preds[i]`` among the classes other than ``labels[i]`` by their
    similarity to ``labels[i]`` (1 = most similar), ties broken at random (seeded); 0 where ``preds[i] ==
    labels[i]``."""
    sim = np.asarray(similarity, dtype=np.float64)
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    k = sim.shape[0]
    rng = np.random.default_rng(seed)
    ranks = np.zeros(len(labels), dtype=np.int64)
    for i in np.flatnonzero(labels != preds):
        t, p = labels[i], preds[i]
        others = np.delete(np.arange(k), t)
        s = sim[t, others]
        sp = sim[t, p]
        above = int((s > sp).sum())
        tied = int((s == sp).sum())  # includes p itself
        ranks[i] = 1 + above + int(rng.integers(tied))
    return ranks


def _binomial(hits: int, n: int, p0: float) -> dict[str, Any]:
    from scipy.stats import binomtest

    from nad_guard.audit.stats import wilson

    out: dict[str, Any] = {"hits": int(hits), "n": int(n), "share": hits / n if n else None, "ci": wilson(hits, n),
                           "chance": p0, "lift": (hits / n) / p0 if n and p0 > 0 else None, "p_value": None}
    if n and p0 < 1:
        out["p_value"] = float(binomtest(int(hits), int(n), p0, alternative="greater").pvalue)
    return out


def k_similar_test(similarity: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str],
                   ks: Sequence[int] = KS, seed: int = 0) -> dict[str, Any]:
    """NAD's test (module docstring) on the rows with ``preds != labels``: per ``k``, overall and per true class,
    the hits, share, Wilson interval, chance ``k / (K - 1)``, lift and one-sided binomial p-value; ``ties``
    counts the mispredictions whose rank depended on a tie."""
    sim = np.asarray(similarity, dtype=np.float64)
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    kk = sim.shape[0]
    wrong = labels != preds
    ranks = similar_ranks(sim, labels, preds, seed)[wrong]
    t, p = labels[wrong], preds[wrong]
    ties = sum(int((np.delete(sim[a], a) == sim[a, b]).sum() > 1) for a, b in zip(t, p))
    out: dict[str, Any] = {"n": int(wrong.sum()), "K": kk, "ties": ties, "by_k": {}}
    for k in ks:
        if k >= kk - 1:  # every other class is among the k most similar: nothing to test
            continue
        p0 = k / (kk - 1)
        hit = ranks <= k
        out["by_k"][str(k)] = {**_binomial(int(hit.sum()), len(hit), p0), "per_class": [
            {"class": class_names[j], **_binomial(int(hit[t == j].sum()), int((t == j).sum()), p0)}
            for j in range(kk)]}
    return out
