"""Baseline detectors: estimator contract, known answers, synthetic features, batch independence,
and the feature-extraction hooks on the tiny digits CNN."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from nad_guard.hooks import capture
from nad_guard.baselines import (LID, MSP, DeepKNN, Energy, Features, Mahalanobis, default_layers,
                                 extract_features)
from nad_guard.models import mnist_cnn, resnet20


pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian_features(n_per_class=150, seed=0):
    """Three classes, two layers (8 and 5 dims); class c is centred at 4 * e_c in each layer.
    Logits predict the true class."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    layers = {}
    for name, dim in (("a", 8), ("b", 5)):
        centres = 4.0 * np.eye(3, dim)
        layers[name] = centres[y] + rng.normal(size=(len(y), dim))
    logits = 5.0 * np.eye(3)[y]
    return Features(layers, logits), y


def _far(n=40, seed=1):
    """Points far from every class centre, each predicted as class 0."""
    rng = np.random.default_rng(seed)
    return Features({"a": rng.normal(12.0, 1.0, size=(n, 8)), "b": rng.normal(-12.0, 1.0, size=(n, 5))},
                    5.0 * np.eye(3)[np.zeros(n, dtype=int)])


def _supervised_kw():
    near, _ = _gaussian_features(40, seed=2)
    det = Features.concat([near, _far(60, seed=3)])
    return dict(detector_features=det, detector_targets=np.r_[np.zeros(len(near)), np.ones(60)])


DETECTORS = {
    "mahalanobis-last": (lambda: Mahalanobis(combine="last"), {}),
    "mahalanobis-lr": (lambda: Mahalanobis(), None),
    "lid-last": (lambda: LID(k=10, n_reference=200, combine="last"), {}),
    "lid-lr": (lambda: LID(k=10, n_reference=200), None),
    "dknn": (lambda: DeepKNN(k=15), {}),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_far_off_points_score_higher_and_scores_are_batch_independent(name):
    make, kw = DETECTORS[name]
    train, y = _gaussian_features()
    det = make().fit_features(train, y, **(_supervised_kw() if kw is None else kw))
    inliers, _ = _gaussian_features(30, seed=5)
    s_in, s_far = det.score_features(inliers), det.score_features(_far())
    assert s_in.shape == (90,) and np.isfinite(s_in).all()
    assert np.median(s_far) > np.quantile(s_in, 0.95)  # higher = more suspicious
    # A sample's score does not depend on the rest of its batch.
    singles = np.array([det.score_features(inliers.subset([i]))[0] for i in (0, 41, 89)])
    np.testing.assert_allclose(singles, s_in[[0, 41, 89]], rtol=1e-6, atol=1e-9)
    reordered = det.score_features(inliers.subset(np.arange(90)[::-1]))[::-1]
    np.testing.assert_allclose(reordered, s_in, rtol=1e-6, atol=1e-9)


def test_deep_knn_flags_label_disagreement_and_low_credibility():
    train, y = _gaussian_features()
    pts, _ = _gaussian_features(20, seed=6)
    wrong = Features(pts.layers, np.roll(pts.logits, 1, axis=1))  # every prediction is another class
    det = DeepKNN(k=15).fit_features(train, y)
    s_wrong, s_right = det.score_features(wrong), det.score_features(pts)
    assert np.median(s_right) < 0.1 and s_wrong.min() > 0.95  # 1 - p-value of the predicted label
    assert s_wrong.min() >= s_right.max()
    p = det.p_values(pts)
    n_cal = len(det.calibration_scores_)
    assert p.shape == (60, 3) and p.min() >= 1 / (n_cal + 1) and p.max() <= 1
    cred = DeepKNN(k=15, label="credibility").fit_features(train, y)
    # Between clusters the neighbours disagree: credibility drops.
    between = Features({n: (v[y == 0][:20] + v[y == 1][:20]) / 2 for n, v in train.layers.items()})
    assert np.median(cred.score_features(between)) > np.quantile(cred.score_features(pts), 0.9)


def test_msp_and_energy_known_answers():
    feats = Features({}, np.array([[0.0, 0.0], [10.0, 0.0], [np.log(3.0), 0.0]]))
    msp = MSP().fit()  # nothing to learn: fit returns self, scoring works without it too
    np.testing.assert_allclose(MSP().score_features(feats), [0.5, 1 / (1 + np.exp(10.0)), 0.25])
    np.testing.assert_allclose(msp.score_features(feats), MSP().score_features(feats))
    np.testing.assert_allclose(Energy().score_features(feats), [-np.log(2.0), -np.logaddexp(10.0, 0.0), -np.log(4.0)])
    # Temperature T: -T logsumexp(logits / T); MSP on logits / T.
    np.testing.assert_allclose(Energy(temperature=2.0).score_features(feats)[0], -2 * np.log(2.0))
    np.testing.assert_allclose(MSP(temperature=10.0).score_features(feats)[1], 1 - 1 / (1 + np.exp(-1.0)))
    # A confident prediction is less suspicious than a flat one under both.
    assert MSP().score_features(feats)[1] < MSP().score_features(feats)[0]
    assert Energy().score_features(feats)[1] < Energy().score_features(feats)[0]


def test_not_fitted_and_bad_arguments_raise():
    train, y = _gaussian_features(20)
    for det in (Mahalanobis(combine="last"), LID(), DeepKNN()):
        with pytest.raises(NotFittedError):
            det.score_features(train)
    with pytest.raises(ValueError, match="combine='last'"):
        Mahalanobis().fit_features(train, y)
    with pytest.raises(ValueError, match="combine='last'"):
        LID().fit_features(train)
    with pytest.raises(ValueError, match="combine must be"):
        Mahalanobis(combine="mean").fit_features(train, y)
    with pytest.raises(ValueError, match="lack the layers"):
        Mahalanobis(combine="last").fit_features(train, y).score_features(Features({"a": train.layers["a"]}))
    with pytest.raises(ValueError, match="logits"):
        DeepKNN(k=5).fit_features(train, y).score_features(Features(train.layers))


def test_sklearn_clone_and_params():
    train, y = _gaussian_features(30)
    for det in (MSP(temperature=2.0), Energy(), Mahalanobis(layers=["b"], combine="last", C=0.5),
                LID(k=7, n_reference=50, combine="last"), DeepKNN(k=9, metric="cosine")):
        fitted = det.fit_features(train, y)
        assert fitted is det
        c = clone(det)
        assert c.get_params() == det.get_params() and type(c) is type(det)
        assert not [k for k in vars(c) if k.endswith("_")]  # clone carries no learned state
    assert Mahalanobis(layers=["b"], combine="last").fit_features(train, y).layers_ == ["b"]


def test_feature_extraction_hooks_defaults_and_caching(tiny_model, digits, tmp_path):
    images = digits[1].subset(range(40))
    layers = default_layers(tiny_model)
    assert layers == ["net.2", "net.5", "net.9"]  # the ReLUs of the tiny CNN
    f = extract_features(tiny_model, images, batch_size=16)
    assert [v.shape for v in f.layers.values()] == [(40, 16), (40, 16), (40, 32)] and f.logits.shape == (40, 10)
    with torch.no_grad():
        np.testing.assert_allclose(f.logits, tiny_model(images.float()).numpy(), rtol=1e-5, atol=1e-5)
    f1 = extract_features(tiny_model, images.float(), batch_size=40)  # tensor input, other batch size
    for n in layers:
        np.testing.assert_allclose(f.layers[n], f1.layers[n], rtol=1e-5, atol=1e-6)
    modules = dict(tiny_model.named_modules())
    assert all(not modules[n]._forward_hooks for n in layers)  # hooks removed
    with pytest.raises(RuntimeError, match="boom"):
        with capture(tiny_model, layers):
            raise RuntimeError("boom")
    assert all(not modules[n]._forward_hooks for n in layers)  # ... also after an error
    with pytest.raises(ValueError, match="no module named"):
        extract_features(tiny_model, images, ["net.nope"])
    f.save(tmp_path / "f.safetensors")
    g = Features.load(tmp_path / "f.safetensors")
    assert list(g.layers) == layers and all(np.array_equal(f.layers[n], g.layers[n]) for n in layers)
    assert np.array_equal(f.logits, g.logits)


def test_default_layers_of_reference_models_exist():
    for model, expected in ((mnist_cnn(), 5), (resnet20(), 10)):
        layers = default_layers(model)
        assert len(layers) == expected
        x = torch.rand(2, *model.spec.shape)
        f = extract_features(model, x)
        assert list(f.layers) == layers and f.logits.shape == (2, 10)
    assert default_layers(resnet20())[1] == "net.layer1.0"


def test_raw_input_path_on_the_tiny_cnn(tiny_model, digits):
    train, test = digits
    train = train.subset(range(400))
    test = test.subset(range(30))
    noisy = (test.float() + 0.5 * torch.rand(30, 1, 8, 8)).clamp(0, 1)
    for det in (MSP(), Energy(), Mahalanobis(combine="last"), LID(k=10, n_reference=300, combine="last"),
                DeepKNN(k=10)):
        det.fit(tiny_model, train, batch_size=128)
        s = det.score(tiny_model, test, batch_size=7)
        assert s.shape == (30,) and np.isfinite(s).all()
        np.testing.assert_allclose(det.score(tiny_model, test.float()[:1]), s[:1], rtol=1e-5, atol=1e-6)
    # Supervised combination from raw images, with Lee et al.'s input pre-processing switched on.
    targets = np.r_[np.zeros(30), np.ones(30)]
    both = torch.cat([test.float(), noisy])
    plain = Mahalanobis().fit(tiny_model, train, detector_images=both, detector_targets=targets)
    pre = Mahalanobis(noise=0.01).fit(tiny_model, train, detector_images=both, detector_targets=targets)
    assert plain.combiner_ is not None and pre.combiner_ is not None
    d_plain = plain.layer_scores(extract_features(tiny_model, noisy, plain.layers_))
    d_pre = pre.layer_scores(pre._extract(tiny_model, noisy, pre.layers_, 64, "cpu"))
    assert (d_pre <= d_plain + 1e-6).mean() > 0.9  # the step lowers the distance
    assert pre.score(tiny_model, noisy).mean() > pre.score(tiny_model, test).mean()
