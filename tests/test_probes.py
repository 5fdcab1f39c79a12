"""The deep check (nad_guard.probes) on the tiny digits CNN: deterministic probes, zero shift for identity
probes, one batched pass, the differentiable counterpart, and its rows in the evaluation harness."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from nad_guard.encoding import features_with_pooled
from nad_guard.probes import (ProbeSpec, probe_batch, probe_column_names, probe_columns, probe_columns_torch,
                              probe_features)
from training.paths import fit_paths

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = ProbeSpec(k=4, transforms=("noise", "bits", "smooth", "shift"), sigma=0.05, bits=3, seed=7)


@pytest.fixture(scope="module")
def paths(tiny_model, digits):
    torch.set_num_threads(1)
    return fit_paths(tiny_model, digits[0], None, epochs=6, batch_size=64, target_keep=0.3, device="cpu",
                     progress=False)


@pytest.fixture(scope="module")
def x(digits):
    return digits[1].float(0, 24)


def test_probes_are_deterministic_per_input_and_prefix_stable(x):
    a = probe_batch(x, SPEC)
    assert a.shape == (5 * len(x), *x.shape[1:])
    assert torch.equal(a, probe_batch(x, SPEC))
    # an input's probes do not depend on its batch
    b = probe_batch(x[3:5], SPEC).view(5, 2, *x.shape[1:])
    assert torch.equal(b[:, 0], a.view(5, len(x), *x.shape[1:])[:, 3])
    # the first k' probes of a spec are the spec with k = k'
    assert torch.equal(probe_batch(x, replace(SPEC, k=2)), a[:3 * len(x)])
    assert not torch.equal(probe_batch(x, replace(SPEC, seed=8)), a)
    assert ProbeSpec.from_dict(SPEC.to_dict()) == SPEC


def test_columns_shape_names_and_identity_probes(paths, x):
    names = probe_column_names(paths.layer_names_, SPEC)
    cols = probe_columns(paths, x, SPEC, batch_size=10)
    L = len(paths.layer_names_)
    assert cols.shape == (len(x), len(names)) == (len(x), 7 * L + 7) and len(set(names)) == len(names)
    assert np.isfinite(cols).all() and cols.std(0).max() > 0
    np.testing.assert_allclose(cols, probe_columns(paths, x, SPEC, batch_size=24), rtol=1e-5, atol=1e-6)
    per = replace(SPEC, per_transform=True)
    assert probe_columns(paths, x, per).shape[1] == len(probe_column_names(paths.layer_names_, per)) == 5 * (7 * L + 7)
    flat = replace(SPEC, per_layer=False)
    assert probe_columns(paths, x, flat).shape[1] == len(probe_column_names(paths.layer_names_, flat)) == 14
    # identity probes (noise only, sigma 0) and k = 0: nothing moves
    ident = probe_columns(paths, x, ProbeSpec(k=3, transforms=("noise",), sigma=0.0))
    np.testing.assert_allclose(ident, 0, atol=1e-5)
    np.testing.assert_array_equal(probe_columns(paths, x, replace(SPEC, k=0)), 0)
    # the share of probes whose prediction changes is a share, and the noisier probes move more
    pred = cols[:, names.index("probe[all]:pred_share")]
    assert set(np.unique(pred)) <= {0, 0.25, 0.5, 0.75, 1}
    big = probe_columns(paths, x, replace(SPEC, sigma=0.3))
    assert big[:, names.index("probe[all]:kl_mean")].mean() > cols[:, names.index("probe[all]:kl_mean")].mean()


def test_one_batched_pass_gives_the_plain_features_too(paths, x):
    calls = []
    h = paths.classifier.net.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    try:
        r = probe_features(paths, x, SPEC, batch_size=len(x))
    finally:
        h.remove()
    assert calls == [5 * len(x)]
    f0, pooled0, cols0 = r
    assert f0 is r.features and cols0.shape == (len(x), len(probe_column_names(paths.layer_names_, SPEC)))
    f, pooled = features_with_pooled(paths, x)
    np.testing.assert_allclose(r.features.X.numpy(), f.X.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(r.features.pred, f.pred) and r.features.names == f.names
    for a, b in zip(r.pooled, pooled):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_differentiable_columns_match_and_have_gradients(paths, x):
    xs = x[:6].clone().requires_grad_(True)
    t = probe_columns_torch(paths, xs, SPEC)
    np.testing.assert_allclose(t.detach().double().numpy(), probe_columns(paths, x[:6], SPEC), rtol=1e-4, atol=1e-5)
    t.sum().backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    # bit-depth rounding alone (BPDA) still passes a gradient
    xb = x[:6].clone().requires_grad_(True)
    probe_columns_torch(paths, xb, ProbeSpec(k=1, transforms=("bits",), sigma=0.0, bits=2)).sum().backward()
    assert xb.grad.abs().sum() > 0


def test_evaluate_adds_deep_rows_and_keeps_single_pass_rows(paths, digits, tmp_path):
    from nad_guard.evaluate import EvalConfig, run_evaluation

    base = dict(suite="fast", attacks=["fgsm", "pgd"], protocols=["seen", "clean-only"], methods=["logistic"],
                encodings=["rich"], clean_methods=["gaussian:rich"], n_resamples=50, progress=False,
                max_images=240, train_images=300)
    plain = run_evaluation(paths, *digits, EvalConfig(**base), cache_dir=tmp_path)
    deep = run_evaluation(paths, *digits, EvalConfig(**base, probes=4), cache_dir=tmp_path)
    name = "nad-guard[deep k=4]"
    key = lambda r: (r["protocol"], r["detector"], r["attack"])  # noqa: E731
    rows = {key(r): r for r in deep["rows"]}
    for r in plain["rows"]:
        np.testing.assert_allclose(rows[key(r)]["auroc"], r["auroc"], rtol=1e-9)
    for protocol in ("seen", "clean-only"):
        got = [r for r in deep["rows"] if r["protocol"] == protocol and r["detector"] == name]
        assert len(got) == 2 and all(0.5 < r["auroc"] <= 1 for r in got)
    assert not any(r["detector"] == name for r in plain["rows"])
    assert deep["timings"]["probe_columns"] > 0 and deep["config"]["probes"] == 4


def test_deployed_and_adaptive_protocols_cover_deep_mode(paths, digits, tmp_path):
    """With probes, the deployed protocol adds the deep guard at its thresholds, and the adaptive protocol
    attacks it twice: through the deployed probes (attacker knows the seed) and by EOT over fresh seeds."""
    from nad_guard.evaluate import EvalConfig, run_evaluation

    cfg = EvalConfig(suite="fast", attacks=["fgsm", "pgd"], protocols=["deployed", "adaptive"], methods=["logistic"],
                     encodings=["rich"], clean_methods=["gaussian:rich"], n_resamples=50, progress=False,
                     max_images=240, train_images=300, probes=2, adaptive_images=8, adaptive_steps=3,
                     adaptive_eot=2, adaptive_eps_scales=(0.5, 1.0), adaptive_objectives=("margin", "hinge:10"),
                     adaptive_targets=("nad-guard-deep", "nad-guard-deep-eot"))
    r = run_evaluation(paths, *digits, cfg, cache_dir=tmp_path)
    deep = [x for x in r["rows"] if x["protocol"] == "deployed" and x["detector"] == "nad-guard[deployed deep k=2]"]
    assert {x["attack"] for x in deep} >= {"fgsm", "pgd"}
    assert len({x["test_fpr"] for x in deep}) == 1 and all(x["tpr_ci"][0] <= x["tpr"] <= x["tpr_ci"][1] for x in deep)
    assert r["deployed"]["deep_detector"]["probes"]["k"] == 2
    a = r["adaptive"]["detectors"]
    assert set(a) == {"nad-guard-deep", "nad-guard-deep-eot"}
    assert a["nad-guard-deep-eot"]["randomized"] and not a["nad-guard-deep"]["randomized"]
    for v in a.values():
        curve = list(v["curve"].values())
        assert all(0 <= c <= 1 for c in curve) and curve == sorted(curve)  # monotone in the budget
    with pytest.raises(ValueError, match="--probes"):
        run_evaluation(paths, *digits, EvalConfig(**{**cfg.to_dict(), "probes": 0, "protocols": ["adaptive"]}),
                       cache_dir=tmp_path)


def test_deep_row_with_the_squeezers_columns(paths, digits, tmp_path):
    """With feature squeezing among the multi-pass baselines, evaluate adds nad-guard's detector on its row +
    the probe columns + the squeezers' distances, next to the deep row, in the protocols that fit it."""
    from types import SimpleNamespace

    from nad_guard.evaluate import EvalConfig, run_evaluation
    from nad_guard.evaluate.protocols import augmented_rows, extra_columns

    cfg = EvalConfig(suite="fast", attacks=["fgsm", "pgd"], protocols=["seen", "clean-only"], methods=["logistic"],
                     encodings=["rich"], clean_methods=["gaussian:rich"], n_resamples=50, progress=False,
                     max_images=240, train_images=300, probes=4, multipass_baselines=["feature-squeezing"])
    assert augmented_rows(cfg) == {"nad-guard[deep k=4]": "probes",
                                   "nad-guard[deep k=4+squeezing]": "probes+feature-squeezing"}
    assert "nad-guard[deep k=4+squeezing]" not in augmented_rows(replace(cfg, multipass_baselines=()))
    fs = SimpleNamespace(extra={"probes": np.ones((3, 5)), "feature-squeezing": np.zeros((3, 2))})
    np.testing.assert_array_equal(extra_columns(fs, "probes+feature-squeezing"), np.c_[np.ones((3, 5)), np.zeros((3, 2))])
    r = run_evaluation(paths, *digits, cfg, cache_dir=tmp_path)
    for protocol in ("seen", "clean-only"):
        got = [x for x in r["rows"] if x["protocol"] == protocol and x["detector"] == "nad-guard[deep k=4+squeezing]"]
        assert len(got) == 2 and all(0.5 < x["auroc"] <= 1 for x in got)
