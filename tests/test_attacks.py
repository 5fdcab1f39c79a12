"""Attack generation on the tiny digits CNN: clean set, success filter, projection, cache, seeds."""

import pytest
import torch

import nad_guard.attacks.generation as generation
from nad_guard.attacks import AttackResult, cache_key, data_hash, generate, get_suite, model_hash, stats_table

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(digits):
    """60 test digits, three of them deliberately mislabelled so that the set always holds images the
    model gets "wrong" (the tiny model may classify all 60 real labels correctly)."""
    part = digits[1].subset(range(60), name="digits/test[:60]")
    labels = part.labels.clone()
    labels[[3, 17, 41]] = (labels[[3, 17, 41]] + 1) % 10
    return type(part)(part.images, labels, part.classes, part.name + "[3 relabelled]")


def _check_invariants(model, images, r: AttackResult, eps: float | None, norm: str = "Linf"):
    x, y = images.float(), images.labels
    with torch.no_grad():
        correct = torch.nonzero(model(x).argmax(1) == y).flatten()
        adv_pred = model(r.adv_images).argmax(1)
    assert torch.equal(r.clean_indices, correct) and r.stats.n_correct == len(correct) < len(images)
    assert set(r.indices.tolist()) <= set(correct.tolist())  # only correctly classified images attacked
    assert torch.equal(r.labels, y[r.indices]) and torch.equal(r.adv_preds, adv_pred)
    assert r.adv_images.dtype == torch.float32 and r.adv_images.min() >= 0 and r.adv_images.max() <= 1
    delta = (r.adv_images - x[r.indices]).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    if eps is not None:
        assert (size <= eps + 1e-6).all()
    assert torch.allclose(size, r.linf if norm == "Linf" else r.l2)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_keeps_only_successful_attacks_on_correct_images(tiny_model, images, attack):
    r = generate(tiny_model, images, attack=attack, suite=get_suite("fast", eps=EPS), batch_size=16, progress=False)
    _check_invariants(tiny_model, images, r, EPS)
    assert r.success.all() and (r.adv_preds != r.labels).all()  # only successful adversarial examples
    assert 0 < r.stats.n_success == len(r) <= r.stats.n_correct
    assert r.stats.success_rate == pytest.approx(len(r) / r.stats.n_correct)
    assert r.stats.mean_linf == pytest.approx(float(r.linf.mean()))
    assert r.stats.seconds > 0 and not r.from_cache and r.key == ""  # no cache asked for
    assert "fgsm" in stats_table({attack: r}) or attack == "pgd"


def test_noise_control_keeps_every_image_and_reports_its_rate(tiny_model, images):
    r = generate(tiny_model, images, attack="noise-linf", suite=get_suite("fast", eps=EPS), batch_size=16,
                 progress=False)
    _check_invariants(tiny_model, images, r, EPS)
    assert len(r) == r.stats.n_correct  # all kept
    assert r.stats.success_rate == pytest.approx(r.success.float().mean().item())
    assert torch.equal(r.success, r.adv_preds != r.labels)
    assert (r.linf > 0.5 * EPS).all()  # noise of the matched size, not a no-op


@pytest.mark.parametrize("attack", ["bim", "pgd-l2", "cw-l2", "deepfool", "apgd-ce", "apgd-dlr", "square", "noise-l2"])
def test_every_attack_of_the_suite_runs(tiny_model, images, attack):
    small = images.subset(range(24))
    spec = get_suite("fast")[attack]
    r = generate(tiny_model, small, attack=attack, suite="fast", batch_size=12, progress=False)
    _check_invariants(tiny_model, small, r, spec.eps, spec.norm)
    if spec.kind != "noise":
        assert len(r) > 0 and r.success.all()


def test_projection_catches_out_of_ball_results(tiny_model, images, monkeypatch):
    # A broken attack that steps outside its ball is projected back, and the check holds.
    class Overshoot:
        def __call__(self, x, y):
            return (x + 0.5).clamp(0, 1)

    monkeypatch.setattr(generation, "build_attack", lambda model, spec: Overshoot())
    r = generate(tiny_model, images, attack="noise-linf", suite=get_suite("fast", eps=EPS), progress=False)
    assert r.linf.max() <= EPS + 1e-6


def test_cache_hit_loads_identical_tensors_without_rerunning(tiny_model, images, tmp_path, monkeypatch):
    suite = get_suite("fast", eps=EPS)
    calls = []
    real = generation.build_attack
    monkeypatch.setattr(generation, "build_attack", lambda m, s: calls.append(s) or real(m, s))
    a = generate(tiny_model, images, attack="pgd", suite=suite, batch_size=16, cache_dir=tmp_path, progress=False)
    b = generate(tiny_model, images, attack="pgd", suite=suite, batch_size=16, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and not a.from_cache and b.from_cache
    for k in AttackResult._TENSORS:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert b.stats == a.stats and b.spec == a.spec and b.key == a.key != ""
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))

    # Other settings, batch size, data or weights: another entry, generated afresh.
    generate(tiny_model, images, attack="pgd", suite=get_suite("fast", eps=0.05), batch_size=16, cache_dir=tmp_path,
             progress=False)
    generate(tiny_model, images, attack="pgd", suite=suite, batch_size=8, cache_dir=tmp_path, progress=False)
    generate(tiny_model, images.subset(range(30)), attack="pgd", suite=suite, batch_size=16, cache_dir=tmp_path,
             progress=False)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.json"))) == 4


def test_cache_key_tracks_model_settings_and_data(tiny_model, images):
    m, d = model_hash(tiny_model), data_hash(images)
    pgd = get_suite("fast")["pgd"]
    keys = {cache_key(m, d, "pgd", pgd, 16),
            cache_key(m, d, "pgd", get_suite("fast", eps=0.2)["pgd"], 16),
            cache_key(m, d, "pgd", get_suite("fast", overrides={"pgd": {"steps": 9}})["pgd"], 16),
            cache_key(m, d, "pgd", get_suite("fast", seed=1)["pgd"], 16),
            cache_key(m, d, "pgd", pgd, 32),
            cache_key(m, data_hash(images.subset(range(59))), "pgd", pgd, 16)}
    assert len(keys) == 6
    assert cache_key(m, d, "pgd", pgd, 16) == cache_key(model_hash(tiny_model), data_hash(images), "pgd", pgd, 16)
    other = type(tiny_model)(tiny_model.net, tiny_model.spec, "renamed")
    assert model_hash(other) != m
    with torch.no_grad():
        other_weights = __import__("copy").deepcopy(tiny_model)
        next(other_weights.parameters()).add_(1e-3)
    assert model_hash(other_weights) != m


def test_cache_key_of_a_fixed_model_data_and_spec_is_pinned():
    """Cached attacks (about 100 minutes of CIFAR-10 ones) are found by key, so moving or refactoring
    this code must not change keys. The literals were computed with the code before nad_guard/attacks.py
    became a package. Keys hash stored bytes and settings only (weights and images set exactly here,
    nothing trained or computed by float kernels), so they are the same on every machine. Update them
    only on purpose: CACHE_FORMAT bumped, the cifar10 suite's PGD settings or torchattacks' version changed."""
    from torch import nn

    from nad_guard.data import ImageSet
    from nad_guard.models import InputSpec, from_module

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.arange(12, dtype=torch.float32).view(3, 4) / 8)
        net[1].bias.copy_(torch.tensor([0.5, -0.25, 1.0]))
    model = from_module(net, InputSpec(1, 2, 2, (0.5,), (0.25,), ["a", "b", "c"]), "pinned-linear")
    data = ImageSet(torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2) * 10, torch.tensor([0, 1, 2, 0, 1, 2]),
                    ["a", "b", "c"], "pinned")
    m, d = model_hash(model), data_hash(data)
    assert m == "bd959b7593eb81add76ff49790096813e8f3765f8ec8b729c6040c04dbfca54d"
    assert d == "86fdef08afe1da2f32fa6a405ef65fa38bcf4d09232b19b2752321279f9a25b8"
    key = cache_key(m, d, "pgd", get_suite("cifar10")["pgd"], 128)
    assert key == "668aefabbd4ed598e211056f5f68d8782e5c4e28fd178a2c4e554e7176c6fef3"


def test_seeded_batches_are_reproducible_and_leave_the_global_rng_alone(tiny_model, images):
    suite = get_suite("fast", eps=EPS)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(tiny_model, images, attack="noise-linf", suite=suite, batch_size=16, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(tiny_model, images, attack="noise-linf", suite=suite, batch_size=16, progress=False)
    c = generate(tiny_model, images, attack="noise-linf", suite=get_suite("fast", eps=EPS, seed=7), batch_size=16,
                 progress=False)
    assert torch.equal(a.adv_images, b.adv_images) and not torch.equal(a.adv_images, c.adv_images)
    for attack in ("pgd", "apgd-ce"):  # a random start from the global RNG; APGD reseeds it itself
        runs = [generate(tiny_model, images, attack=attack, suite=suite, batch_size=16, progress=False)
                for _ in range(2)]
        assert torch.equal(runs[0].adv_images, runs[1].adv_images)


def test_tensor_input_matches_imageset_input(tiny_model, images):
    suite = get_suite("fast", eps=EPS)
    a = generate(tiny_model, images, attack="fgsm", suite=suite, progress=False)
    b = generate(tiny_model, images.float(), images.labels, attack="fgsm", suite=suite, progress=False)
    assert torch.equal(a.adv_images, b.adv_images) and torch.equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="labels are required"):
        generate(tiny_model, images.float(), attack="fgsm", suite=suite, progress=False)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        generate(tiny_model, images.float() * 255, images.labels, attack="fgsm", suite=suite, progress=False)


def test_suites_and_overrides():
    mnist, cifar = get_suite("mnist"), get_suite("cifar10")
    assert mnist["pgd"].eps == 0.3 and cifar["pgd"].eps == pytest.approx(8 / 255)
    assert mnist["cw-l2"].eps is None and mnist["deepfool"].eps is None
    assert {"fgsm", "bim", "pgd", "pgd-l2", "cw-l2", "deepfool", "apgd-ce", "apgd-dlr", "square",
            "noise-linf", "noise-l2"} <= set(mnist.names) == set(cifar.names)
    assert cifar["apgd-dlr"].params["loss"] == "dlr" and cifar["square"].params["n_queries"] <= 5000
    half = get_suite("cifar10", eps=4 / 255)
    assert half["pgd"].params["alpha"] == pytest.approx(cifar["pgd"].params["alpha"] / 2)
    assert half["noise-linf"].eps == pytest.approx(4 / 255)
    o = get_suite("mnist", overrides={"cw-l2": {"c": 20.0}, "pgd": {"eps": 0.2}})
    assert o["cw-l2"].params["c"] == 20.0 and o["cw-l2"].params["steps"] == mnist["cw-l2"].params["steps"]
    assert o["pgd"].eps == 0.2 and o.name != mnist.name
    with pytest.raises(ValueError, match="unknown attack suite"):
        get_suite("imagenet-huge")
    with pytest.raises(ValueError, match="has no attack"):
        mnist["pgd-l7"]
    with pytest.raises(ValueError, match="unknown attack"):
        get_suite("mnist", overrides={"pgd-l7": {}})


def test_lee2018_suite_has_the_budgets_of_their_code(tiny_model, images):
    """Lee et al.'s released settings: FGSM one step of 0.05, BIM six steps of 0.01 with no
    projection (so up to 0.06), DeepFool 1.8x the linearised step for at most 5 steps, CW-L2 100 steps."""
    suite = get_suite("lee2018")
    assert suite["fgsm"].eps == 0.05 and suite["bim"].params == {"alpha": pytest.approx(0.01), "steps": 6}
    assert suite["bim"].eps == pytest.approx(0.06)  # six steps of 0.01: the ball never binds
    assert suite["deepfool"].params == {"steps": 5, "overshoot": 0.0, "step_size": 1.8}
    assert suite["cw-l2"].params["steps"] == 100 and suite["cw-l2"].eps is None
    x = images.float()
    linf = {}
    for attack in ("fgsm", "bim"):
        r = generate(tiny_model, images, attack=attack, suite=suite, batch_size=32, progress=False)
        _check_invariants(tiny_model, images, r, suite[attack].eps)
        linf[attack] = (r.adv_images - x[r.indices]).flatten(1).abs().amax(1)
    assert linf["fgsm"].max().item() == pytest.approx(0.05, abs=1e-6)  # one full step on unclipped pixels
    assert linf["bim"].max().item() > 0.05 + 1e-3 and (linf["bim"] <= 0.06 + 1e-6).all()
    r = generate(tiny_model, images, attack="deepfool", suite=suite, batch_size=32, progress=False)
    _check_invariants(tiny_model, images, r, None, norm="L2")
    assert len(r) > 0.8 * r.stats.n_correct  # the overshooting steps cross the boundary
