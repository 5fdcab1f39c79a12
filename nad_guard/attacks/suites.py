"""Attack settings: :class:`AttackSpec` (one attack), :class:`AttackSuite` (a named set of them) and
the per-dataset suites ``mnist``, ``cifar10``, ``fast`` and ``lee2018`` (the attack settings of Lee et
al. 2018's released code), built by :func:`get_suite`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

NOISE_ATTACKS = ("noise-linf", "noise-l2")


@dataclass(frozen=True)
class AttackSpec:
    """One attack's settings.

    ``kind`` picks the implementation; ``norm`` and ``eps`` give the threat model (``eps=None``:
    unbounded, e.g. CW and DeepFool); ``params`` are the remaining constructor keywords; ``seed``
    seeds each batch (``seed + batch index``).
    """

    kind: str
    norm: str
    eps: float | None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = dict(sorted(self.params.items()))
        return d


@dataclass(frozen=True)
class AttackSuite:
    """A named set of attacks with their settings."""

    name: str
    attacks: Mapping[str, AttackSpec]

    @property
    def names(self) -> list[str]:
        return list(self.attacks)

    def __getitem__(self, attack: str) -> AttackSpec:
        if attack not in self.attacks:
            raise ValueError(f"suite {self.name!r} has no attack {attack!r}; it has {', '.join(self.attacks)}")
        return self.attacks[attack]


def _standard(eps: float, eps_l2: float, *, bim: tuple[float, int], pgd: tuple[float, int],
              pgd_l2: tuple[float, int], cw: dict[str, Any], deepfool: dict[str, Any], apgd_steps: int,
              square_queries: int) -> dict[str, AttackSpec]:
    """All attacks; step sizes are given as fractions of ``eps``."""
    return {
        "fgsm": AttackSpec("fgsm", "Linf", eps),
        "bim": AttackSpec("bim", "Linf", eps, {"alpha": eps * bim[0], "steps": bim[1]}),
        "pgd": AttackSpec("pgd", "Linf", eps, {"alpha": eps * pgd[0], "steps": pgd[1], "random_start": True}),
        "pgd-l2": AttackSpec("pgdl2", "L2", eps_l2, {"alpha": eps_l2 * pgd_l2[0], "steps": pgd_l2[1],
                                                     "random_start": True}),
        "cw-l2": AttackSpec("cw", "L2", None, cw),
        "deepfool": AttackSpec("deepfool", "L2", None, deepfool),
        "apgd-ce": AttackSpec("apgd", "Linf", eps, {"steps": apgd_steps, "loss": "ce", "n_restarts": 1}),
        "apgd-dlr": AttackSpec("apgd", "Linf", eps, {"steps": apgd_steps, "loss": "dlr", "n_restarts": 1}),
        "square": AttackSpec("square", "Linf", eps, {"n_queries": square_queries, "p_init": 0.8, "n_restarts": 1,
                                                     "loss": "margin"}),
        "noise-linf": AttackSpec("noise", "Linf", eps),
        "noise-l2": AttackSpec("noise", "L2", eps_l2),
    }


def _mnist(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    # PGD as Madry et al. on MNIST (0.01 steps for eps 0.3, 40 steps). Measured on 200 mnist5k test
    # images with the reference CNN: CW c=10, Adam lr 0.1, 100 steps succeeds on all of them
    # (c=1, lr 0.01: ~12%); DeepFool needs ~100 steps on MNIST (50: ~80%).
    return _standard(eps, eps_l2, bim=(1 / 20, 30), pgd=(1 / 30, 40), pgd_l2=(1 / 20, 40),
                     cw={"c": 10.0, "kappa": 0.0, "steps": 100, "lr": 0.1},
                     deepfool={"steps": 100, "overshoot": 0.02}, apgd_steps=50, square_queries=1000)


def _cifar10(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    # BIM: Kurakin's rule for 8/255 (alpha 1/255, 10 steps); PGD-20 with alpha 2/255.
    return _standard(eps, eps_l2, bim=(1 / 8, 10), pgd=(1 / 4, 20), pgd_l2=(1 / 5, 20),
                     cw={"c": 10.0, "kappa": 0.0, "steps": 100, "lr": 0.01},
                     deepfool={"steps": 50, "overshoot": 0.02}, apgd_steps=50, square_queries=1000)


def _fast(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    """Every attack with a handful of steps: for tests, not for numbers."""
    return _standard(eps, eps_l2, bim=(1 / 3, 3), pgd=(1 / 3, 3), pgd_l2=(1 / 3, 3),
                     cw={"c": 10.0, "kappa": 0.0, "steps": 10, "lr": 0.1},
                     deepfool={"steps": 10, "overshoot": 0.02}, apgd_steps=3, square_queries=20)


def _lee2018(eps: float, eps_l2: float) -> dict[str, AttackSpec]:
    """The attacks of Lee et al. 2018's released code (``ADV_Samples.py`` in
    pokaxpoka/deep_Mahalanobis_detector, ResNet on CIFAR-10), in ``[0, 1]`` pixel units; ``eps`` is
    FGSM's step (theirs: 0.05), ``eps_l2`` the L2 size of the noisy control images. What matches and
    what differs is in docs/lee2018.md."""
    var = (0.2023 ** 2 + 0.1994 ** 2 + 0.2010 ** 2) / 3  # their normalisation's mean variance
    return {
        # one signed-gradient step of the cross-entropy
        "fgsm": AttackSpec("fgsm", "Linf", eps),
        # six signed-gradient steps of eps / 5 with no projection: the ball eps * 1.2 never binds
        "bim": AttackSpec("bim", "Linf", eps * 6 / 5, {"alpha": eps / 5, "steps": 6}),
        # their step_size 0.18 on gradients divided by the 10 classes (a mean-reduced NLL over the class
        # copies): 1.8 times the linearised step, at most 5 steps, all classes
        "deepfool": AttackSpec("deepfool", "L2", None, {"steps": 5, "overshoot": 0.0, "step_size": 1.8}),
        # c = 1 and Adam lr 0.01 on the squared L2 in normalised units: c * var and lr / 2 in pixel units
        # (the tanh box's slope is about 1/2 at mid-grey); 100 steps, kappa 0
        "cw-l2": AttackSpec("cw", "L2", None, {"c": round(var, 4), "kappa": 0.0, "steps": 100, "lr": 0.005}),
        # their "noisy" negatives: Gaussian noise of std 0.0625 in normalised units (~0.0126 pixels);
        # its L2 size concentrates at std * sqrt(3 * 32 * 32) ~ 0.70, its L-inf size is ~4 std ~ 0.05
        "noise-l2": AttackSpec("noise", "L2", eps_l2),
        "noise-linf": AttackSpec("noise", "Linf", eps),
    }


SUITES: dict[str, tuple[Any, float, float]] = {
    "mnist": (_mnist, 0.3, 2.0),
    "cifar10": (_cifar10, 8 / 255, 0.5),
    "fast": (_fast, 0.3, 2.0),
    "lee2018": (_lee2018, 0.05, 0.70),
}


def get_suite(name: str, *, eps: float | None = None, eps_l2: float | None = None,
              overrides: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0) -> AttackSuite:
    """A named suite, optionally with another L-inf ``eps`` / L2 ``eps_l2`` (step sizes scale with
    them) and per-attack ``overrides``: ``{"cw-l2": {"c": 20}, "pgd": {"eps": 0.2, "steps": 100}}``
    (``eps``, ``norm`` and ``seed`` set the spec's fields, anything else a constructor keyword)."""
    if name not in SUITES:
        raise ValueError(f"unknown attack suite {name!r}; choose one of {', '.join(SUITES)}")
    build, default_eps, default_l2 = SUITES[name]
    eps = default_eps if eps is None else float(eps)
    eps_l2 = default_l2 if eps_l2 is None else float(eps_l2)
    if not (0 < eps <= 1) or eps_l2 <= 0:
        raise ValueError(f"eps must be in (0, 1] and eps_l2 positive, got {eps}, {eps_l2}")
    attacks = build(eps, eps_l2)
    attacks = {k: replace(v, seed=seed) for k, v in attacks.items()}
    for attack, changes in (overrides or {}).items():
        if attack not in attacks:
            raise ValueError(f"override for unknown attack {attack!r}; suite {name!r} has {', '.join(attacks)}")
        spec = attacks[attack]
        fields = {k: changes[k] for k in ("eps", "norm", "seed") if k in changes}
        params = {**spec.params, **{k: v for k, v in changes.items() if k not in fields}}
        attacks[attack] = replace(spec, params=params, **fields)
    suffix = "" if (eps, eps_l2) == (default_eps, default_l2) else f"(eps={eps:g},eps_l2={eps_l2:g})"
    return AttackSuite(name + suffix + ("+overrides" if overrides else ""), attacks)
