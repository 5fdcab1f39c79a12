"""The audit's interpretability claims (nad_guard.audit.class_paths, .saliency, .explain): NAD's k-most-similar
test on constructed cases with known answers, the deletion metric on a model that looks at one pixel, and
the divergence layer and the paired comparison by hand. The claims on a real guard (the report's sections,
each misprediction's path against the guard's own path features) are tested in test_audit.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from nad_guard.audit.class_paths import ClassPaths, k_similar_test, similar_ranks
from nad_guard.audit.explain import divergence_layer
from nad_guard.audit.saliency import (deletion_auc, deletion_curves, deletion_orders, gradient_saliency,
                                      paired_comparison)
from nad_guard.paths.features import mask_similarity

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", "b", "c", "d"]
# class a's similarity to b, c, d: 0.9 > 0.5 > 0.1 (b is a's most similar); b's: a 0.9 > d 0.7 > c 0.2
SIM = np.array([[1.0, 0.9, 0.5, 0.1],
                [0.9, 1.0, 0.2, 0.7],
                [0.5, 0.2, 1.0, 0.3],
                [0.1, 0.7, 0.3, 1.0]])


def test_k_similar_test_counts_hits_against_chance_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    preds = np.array([1, 1, 2, 3, 0, 3, 0, 1, 3, 3])  # the last two are correct: left out
    # ranks among the true class's other classes: a->b 1, a->b 1, a->c 2, a->d 3, b->a 1, b->d 2, c->a 1, d->b 1
    assert similar_ranks(SIM, labels, preds).tolist() == [1, 1, 2, 3, 1, 2, 1, 1, 0, 0]
    t = k_similar_test(SIM, labels, preds, NAMES, ks=(1, 2, 3))
    assert t["n"] == 8 and t["K"] == 4 and t["ties"] == 0
    assert set(t["by_k"]) == {"1", "2"}  # k = 3 = K - 1 holds every other class: nothing to test
    one, two = t["by_k"]["1"], t["by_k"]["2"]
    assert (one["hits"], one["n"], two["hits"]) == (5, 8, 7)
    assert one["chance"] == pytest.approx(1 / 3) and two["chance"] == pytest.approx(2 / 3)
    assert one["share"] == pytest.approx(5 / 8) and one["lift"] == pytest.approx(15 / 8)
    assert one["p_value"] == pytest.approx(binomtest(5, 8, 1 / 3, alternative="greater").pvalue, rel=1e-9)
    lo, hi = one["ci"]
    assert lo < 5 / 8 < hi
    per = {r["class"]: r for r in one["per_class"]}
    assert (per["a"]["hits"], per["a"]["n"]) == (2, 4) and (per["b"]["hits"], per["b"]["n"]) == (1, 2)
    assert (per["c"]["hits"], per["d"]["hits"], per["d"]["n"]) == (1, 1, 1)


def test_k_similar_ties_are_broken_at_random_so_chance_is_exact():
    rng = np.random.default_rng(1)
    k = 5
    labels = rng.integers(0, k, 4000)
    preds = (labels + rng.integers(1, k, 4000)) % k  # uniform over the other classes: the null hypothesis
    flat = np.ones((k, k))  # every class equally similar: every rank is a tie
    t = k_similar_test(flat, labels, preds, [str(i) for i in range(k)], ks=(1,), seed=3)
    assert t["ties"] == 4000
    assert t["by_k"]["1"]["share"] == pytest.approx(1 / 4, abs=0.025)
    assert t["by_k"]["1"]["p_value"] > 0.01
    # with distinct similarities, a null prediction is still a hit 1/(K-1) of the time
    t = k_similar_test(SIM, labels % 4, (labels % 4 + rng.integers(1, 4, 4000)) % 4, NAMES, ks=(1,))
    assert t["by_k"]["1"]["share"] == pytest.approx(1 / 3, abs=0.03)


def test_class_path_similarity_is_the_masks_jaccard_and_a_weighted_one_for_gates():
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(4, 16, generator=g) > 0.5, torch.rand(4, 8, generator=g) > 0.6]
    src = ClassPaths("masks", "", ["l1", "l2"], [m.numpy().astype(float) for m in masks])
    np.testing.assert_allclose(src.similarity(), mask_similarity(masks).numpy(), rtol=1e-6, atol=1e-6)
    soft = ClassPaths("gates", "", ["l"], [np.array([[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]])])
    assert soft.similarity()[0, 1] == pytest.approx((0.5 + 0.5 + 0.0) / (1.0 + 0.5 + 0.5))


class OnePixel(nn.Module):
    """Two classes; the logit of class 0 is ``4 * x[0, 2, 3]``, class 1's is 0: it looks at one pixel only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 4.0 * x[:, 0, 2, 3]
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_deletion_metric_on_a_model_that_looks_at_one_pixel():
    model = OnePixel()
    x = torch.ones(2, 1, 6, 6)
    y = torch.zeros(2, dtype=torch.long)
    sal = gradient_saliency(model, x, y)
    assert sal.shape == (2, 6, 6) and float(sal[0, 2, 3]) == pytest.approx(4.0) and float(sal.sum()) == pytest.approx(8)
    best = deletion_orders(sal)
    assert best[:, 0].tolist() == [2 * 6 + 3] * 2
    worst = torch.flip(best, [1])  # the one pixel removed last
    prob = lambda v: model(v).softmax(1)  # noqa: E731
    steps = 6  # 36 pixels: 6 per step
    p0, p_off = 1 / (1 + math.exp(-4.0)), 0.5
    good = deletion_curves(prob, x, y, best, steps)
    bad = deletion_curves(prob, x, y, worst, steps)
    np.testing.assert_allclose(good[0], [p0] + [p_off] * steps, rtol=1e-6)
    np.testing.assert_allclose(bad[0], [p0] * steps + [p_off], rtol=1e-6)
    auc_good = (p0 + p_off) / (2 * steps) + p_off * (steps - 1) / steps
    auc_bad = p0 * (steps - 1) / steps + (p0 + p_off) / (2 * steps)
    np.testing.assert_allclose(deletion_auc(good), [auc_good] * 2, rtol=1e-6)
    np.testing.assert_allclose(deletion_auc(bad), [auc_bad] * 2, rtol=1e-6)
    # the comparison says the gradient's order is better (lower AUC), every time
    cmp = paired_comparison(deletion_auc(good), deletion_auc(bad))
    assert cmp["mean_difference"] == pytest.approx(auc_good - auc_bad) and cmp["share_lower"] == 1.0
    assert cmp["ci"][1] < 0


def test_paired_comparison_and_divergence_layer_by_hand():
    cmp = paired_comparison(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.5, 3.5, 5.0]), seed=0)
    assert cmp["mean_difference"] == pytest.approx(-0.75) and cmp["median_difference"] == pytest.approx(-0.75)
    assert cmp["share_lower"] == 1.0 and cmp["ci"][0] <= -0.75 <= cmp["ci"][1] < 0
    assert paired_comparison(np.ones(3), np.ones(3))["wilcoxon_p"] is None
    assert divergence_layer(np.array([1, 1, 0, 0]), np.array([0, 2, 1, 1])) == 1
    assert divergence_layer(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1])) == 3
    assert divergence_layer(np.array([0, 0, 0]), np.array([1, 1, 1])) == 0
    assert divergence_layer(np.array([0, 0, 1]), np.array([1, 1, 0])) is None
