"""Class paths, the thing the audit's claims compare classes by, and NAD's own test of them.

A *class-path source* gives, at every gate point, one vector per class over the layer's channels: today
the binary NAD masks of the guard's :class:`~nad_guard.paths.PathModel` (:func:`class_paths_from_masks`);
a per-input path encoder's class-average gates (values in ``[0, 1]``) fit the same :class:`ClassPaths`
and are added as one more source in :func:`class_path_sources`. The similarity of two classes is the mean
over gate points of the weighted Jaccard index ``sum_c min(u_c, v_c) / sum_c max(u_c, v_c)`` of their
vectors, which for binary masks is the plain Jaccard index of
:meth:`PathModel.similarity <nad_guard.paths.PathModel.similarity>`.

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

KS = (1, 3)  # the k of NAD's test: the predicted class among the true class's k most similar


@dataclass
class ClassPaths:
    """One source of class paths: ``vectors[l]`` ``(K, C_l)`` float in ``[0, 1]`` at gate point ``layers[l]``."""

    name: str
    description: str
    layers: list[str]
    vectors: list[np.ndarray]

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


def class_path_sources(guard: Any) -> list[ClassPaths]:
    """Every class-path source the guard holds, the masks first. A new source (e.g. an architecture
    encoder's class-average gate vectors, issue 20) is one more :class:`ClassPaths` appended here."""
    return [class_paths_from_masks(guard.paths)]


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
