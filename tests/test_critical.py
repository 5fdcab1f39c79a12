"""CDRP-style per-input critical paths (nad_guard.critical) on the tiny digits CNN."""

from __future__ import annotations

import pytest
import torch

from nad_guard.critical import critical_paths
from nad_guard.data import ImageSet
from nad_guard.models import Classifier
from nad_guard.hooks import hooked
from nad_guard.paths import apply_gate, find_gate_points


@pytest.fixture(scope="module")
def images(digits: tuple[ImageSet, ImageSet]) -> torch.Tensor:
    return digits[1].float(0, 16)


def test_paths_keep_the_prediction_and_are_sparse(tiny_model: Classifier, images: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cp = critical_paths(tiny_model, images, batch_size=8)
    points = find_gate_points(tiny_model)
    assert cp.layers == [p.name for p in points]
    for p in points:
        g = cp.gates[p.name]
        assert g.shape == (16, p.channels) and g.min() >= 0 and g.max() <= 5
    with torch.no_grad():
        pred = tiny_model(images).argmax(1)
        assert torch.equal(cp.pred, pred)
        with hooked(tiny_model.net, cp.layers, lambda i, out: apply_gate(out, cp.gates[cp.layers[i]])):
            gated = tiny_model(images).argmax(1)
    assert torch.equal(gated, pred)  # the returned path keeps every image's top-1
    assert (cp.best_step > 0).float().mean() > 0.9  # a sparser path than the start was found for most
    assert cp.vector().shape == (16, sum(p.channels for p in points))
    assert cp.vector().mean() < 0.9 and cp.kept_fraction().shape == (16,)
    # the classifier is untouched: same weights, frozen, no hooks left
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert not any(m._forward_hooks for m in tiny_model.modules())


def test_paths_do_not_depend_on_the_batch(tiny_model: Classifier, images: torch.Tensor) -> None:
    alone = critical_paths(tiny_model, images[:6], steps=10, batch_size=6)
    together = critical_paths(tiny_model, images, steps=10, batch_size=16)
    for n in alone.layers:
        torch.testing.assert_close(alone.gates[n], together.gates[n][:6], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.best_step, together.best_step[:6])


def test_zero_steps_return_the_full_network(tiny_model: Classifier, images: torch.Tensor) -> None:
    cp = critical_paths(tiny_model, images[:4], steps=0)
    assert torch.equal(cp.best_step, torch.zeros(4, dtype=torch.long))
    assert all(torch.equal(g, torch.ones_like(g)) for g in cp.gates.values())


def test_bad_arguments_raise(tiny_model: Classifier, images: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        critical_paths(tiny_model, images, steps=-1)
    with pytest.raises(ValueError):
        critical_paths(tiny_model, images, sparsity=-0.1)
    with pytest.raises(ValueError):
        critical_paths(tiny_model, images[:, :, :4])
    assert not any(m._forward_hooks for m in tiny_model.modules())
