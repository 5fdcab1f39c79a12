"""The adaptive attack (nad_guard.attacks.adaptive) on the tiny digits CNN: EOT, BPDA, the evasion curve and
the real decision."""

import pytest
import torch

from nad_guard.attacks import AdaptiveTarget, adaptive_pgd, budget_at, eot_gradient, evasion_curve, straight_through
from nad_guard.attacks.adaptive import class_margin, objective_loss, parse_objective

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(tiny_model, digits):
    x, y = digits[1].float(0, 48), digits[1].labels[:48]
    with torch.no_grad():
        ok = tiny_model(x).argmax(1) == y
    return tiny_model, x[ok], y[ok]


def bit_depth(x: torch.Tensor, bits: int = 3) -> torch.Tensor:
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


def msp_like(clf, flag_rule=None, name="msp") -> AdaptiveTarget:
    """A deterministic defence: the detector term is the max softmax centred at 0.9 (flag above it)."""
    def loss_terms(x, gen):
        z = clf(x)
        return z, (1 - torch.softmax(z, 1).amax(1)) - 0.1

    def decide(x):
        z = clf(x)
        flagged = (1 - torch.softmax(z, 1).amax(1)) > 0.1 if flag_rule is None else flag_rule(x)
        return z.argmax(1), flagged

    return AdaptiveTarget(name, loss_terms, decide)


def test_eot_averages_the_gradient_over_the_defences_draws(batch):
    """A defence whose detector term is +-<u, x> with a fair coin drawn from the generator: EOT's gradient is
    the mean of the per-draw gradients (replayed from the same seed) and, over many draws, close to the
    margin's gradient alone (the coin's part averages out); one draw is not."""
    clf, x, y = batch
    x, y = x[:8], y[:8]
    u = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(1))

    def loss_terms(xx, gen):
        sign = torch.randint(0, 2, (1,), generator=gen).item() * 2 - 1
        return clf(xx), sign * (xx * u).flatten(1).sum(1)

    target = AdaptiveTarget("coin", loss_terms, lambda xx: (clf(xx).argmax(1), torch.zeros(len(xx), dtype=torch.bool)),
                            randomized=True)
    g = eot_gradient(target, x, y, "sum:1", 6, torch.Generator().manual_seed(5))
    replay, per_draw = torch.Generator().manual_seed(5), []
    for _ in range(6):
        per_draw.append(eot_gradient(target, x, y, "sum:1", 1, replay))
    torch.testing.assert_close(g, torch.stack(per_draw).mean(0), rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(per_draw[0], p) for p in per_draw[1:])  # the draws differ
    margin_only = eot_gradient(target, x, y, "margin", 1, torch.Generator().manual_seed(0))
    many = eot_gradient(target, x, y, "sum:1", 400, torch.Generator().manual_seed(2))
    err_many = (many - margin_only).abs().mean() / u.abs().mean()
    err_one = (per_draw[0] - margin_only).abs().mean() / u.abs().mean()
    assert err_one == pytest.approx(1.0, rel=1e-4) and err_many < 0.15


def test_bpda_passes_the_gradient_through_a_rounding_transform(batch):
    clf, x, y = batch
    x, y = x[:8], y[:8]
    for squeeze, expect_zero in ((bit_depth, True), (straight_through(bit_depth), False)):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(class_margin(clf(squeeze(xg)), y).sum(), xg)
        assert (g.abs().sum() == 0) == expect_zero
    # BPDA's gradient is the classifier's gradient at the squeezed point; its forward is the squeezed input
    q = bit_depth(x).requires_grad_(True)
    (at_q,) = torch.autograd.grad(class_margin(clf(q), y).sum(), q)
    xg = x.clone().requires_grad_(True)
    out = straight_through(bit_depth)(xg)
    torch.testing.assert_close(out.detach(), bit_depth(x))
    (g,) = torch.autograd.grad(class_margin(clf(out), y).sum(), xg)
    torch.testing.assert_close(g, at_q, rtol=1e-5, atol=1e-6)


def test_a_bpda_attack_beats_a_squeezing_defence_that_masks_gradients(batch):
    """The defence classifies the bit-depth-reduced input; PGD through the raw rounding gets no gradient
    and fools nothing beyond its random start, PGD with BPDA does."""
    clf, x, y = batch
    none = lambda xx: torch.zeros(len(xx), dtype=torch.bool)  # noqa: E731

    def target(squeeze):
        return AdaptiveTarget("squeezed", lambda xx, gen: (clf(squeeze(xx)), torch.zeros(len(xx))),
                              lambda xx: (clf(bit_depth(xx)).argmax(1), none(xx)))

    masked, _ = adaptive_pgd(target(bit_depth), x, y, 0.3, 10, "margin", seed=0)
    bpda, x_adv = adaptive_pgd(target(straight_through(bit_depth)), x, y, 0.3, 10, "margin", seed=0)
    assert bpda.float().mean() > masked.float().mean() + 0.3
    assert (x_adv - x).abs().amax() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_the_evasion_curve_is_monotone_in_eps_and_gives_the_half_budget(batch):
    clf, x, y = batch
    grid = [0.3, 0.025, 0.05, 0.1]
    curve = evasion_curve(msp_like(clf), x, y, grid, ["margin", "hinge:10", "selective"], steps=5, batch_size=16)
    assert curve.eps == sorted(grid) and curve.images == len(x)
    assert all(a <= b for a, b in zip(curve.evades, curve.evades[1:]))
    assert (curve.per_image[:, 1:] >= curve.per_image[:, :-1]).all()  # an evader stays one at larger budgets
    assert curve.evades[0] < curve.evades[-1]
    for r, first in zip(curve.evades, curve.first_evaded_by):
        assert set(first) == {"margin", "hinge:10", "selective"}
    assert sum(sum(f.values()) for f in curve.first_evaded_by) == round(curve.evades[-1] * len(x))
    b, bound = budget_at(curve.eps, curve.evades, 0.5)
    d = curve.to_dict()
    assert d["budget_50"] == b and d["budget_50_bound"] == bound
    if b is not None:
        assert 0 < b <= 0.3
    assert budget_at([1, 2, 4], [0.2, 0.4, 0.8]) == (pytest.approx(2.5), None)
    assert budget_at([1, 2], [0.6, 0.9]) == (pytest.approx(1 / 1.2), None)  # from (0, 0)
    assert budget_at([1, 2], [0.1, 0.2]) == (None, "above")


def test_evasion_is_decided_by_the_real_flag_not_the_surrogate(batch):
    """The surrogate says 'never flagged'; a real decision that flags everything leaves nothing evading,
    one that flags nothing leaves every misclassified image evading."""
    clf, x, y = batch

    def target(flag_all: bool) -> AdaptiveTarget:
        return AdaptiveTarget("t", lambda xx, gen: (clf(xx), torch.full((len(xx),), -5.0)),
                              lambda xx: (clf(xx).argmax(1), torch.full((len(xx),), flag_all)))

    caught, _ = adaptive_pgd(target(True), x, y, 0.3, 5, "sum:1", seed=0)
    free, x_adv = adaptive_pgd(target(False), x, y, 0.3, 5, "sum:1", seed=0)
    assert not caught.any() and free.float().mean() > 0.5
    with torch.no_grad():
        assert (clf(x_adv[free]).argmax(1) != y[free]).all()


def test_objectives_are_checked_and_consistent():
    assert parse_objective("hinge:10") == ("hinge", 10.0) and parse_objective("selective") == ("selective", 0.0)
    for bad in ("sum", "margin:3", "cw"):
        with pytest.raises(ValueError):
            parse_objective(bad)
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0])
    det = torch.tensor([1.0, -2.0])
    # hinge: the detector term vanishes once it is slack below the threshold
    torch.testing.assert_close(objective_loss("hinge:10", logits, det, y, slack=0.5), torch.tensor([2.0 + 15.0, -1.0]))
    # selective: the margin while classified right, the detector once wrong and still flagged, else the margin
    torch.testing.assert_close(objective_loss("selective", logits, torch.tensor([1.0, 0.3]), y),
                               torch.tensor([2.0, 0.3]))
    torch.testing.assert_close(objective_loss("selective", logits, det, y), torch.tensor([2.0, -1.0]))
