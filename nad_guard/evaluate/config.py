"""What one evaluation run does: :class:`EvalConfig`, the protocols and ways of choosing nad-guard's
detector it knows, and the baselines' names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from nad_guard.attacks import AttackSuite
    from nad_guard.probes import ProbeSpec

SELECT = ("fixed", "cv")
PROTOCOLS = ("seen", "unseen", "fgsm-only", "clean-only", "mispredictions", "deployed", "adaptive")
# the protocols whose negatives take EvalConfig.noisy_negatives (the ones that train on attacks)
NOISY_NEGATIVE_PROTOCOLS = ("seen", "unseen", "fgsm-only")
MIN_MISPREDICTIONS = 10
UNSUPERVISED_BASELINES = ("msp", "energy", "mahalanobis", "lid", "deep-knn")
SUPERVISED_BASELINES = ("mahalanobis-lr", "lid-lr")
# baselines that run the classifier again on transformed images (nad_guard.evaluate.multipass); opt-in
MULTIPASS_BASELINES = ("feature-squeezing", "odds")


@dataclass
class EvalConfig:
    """Settings of one evaluation run.

    ``methods`` x ``encodings``: the supervised nad-guard detectors tried. Which one stands for
    nad-guard in each training task: ``select="fixed"``: ``primary`` (fixed before looking at
    results); ``select="cv"``: the candidate with the best grouped ``cv_folds``-fold cross-validated
    AUROC on that task's training data (the fit part only, see
    :func:`nad_guard.detectors.select_by_cv`). Neither ever looks at the evaluation part.
    ``clean_methods``: nad-guard's clean-only detectors, each ``method`` or ``method:encoding``
    (``primary``'s encoding when omitted); the first is nad-guard in the clean-only protocol.
    ``multipass_baselines``: any of :data:`MULTIPASS_BASELINES`, unsupervised rows next to MSP's (none by
    default: they run the classifier again on every image of the run, feature squeezing 3-4 more passes,
    the Odds ``1 + 9 * odds_samples``; see :mod:`nad_guard.evaluate.multipass`); ``odds_samples``: noise draws per
    noise setting of the Odds (the paper's 256).
    ``maha_noise``: noise magnitudes of Lee et al.'s input pre-processing (e.g.
    :data:`nad_guard.baselines.mahalanobis_pre.LEE_NOISE`); non-empty adds the row ``mahalanobis-lr[pre]``
    to the supervised protocols (:mod:`nad_guard.evaluate.maha_pre`); empty (the default): off.
    ``noisy_negatives``: noise controls of the suite (e.g. ``("noise-l2",)``) counted as negatives, as Lee et
    al. (2018) count their noisy images, in the :data:`NOISY_NEGATIVE_PROTOCOLS`: generated on the fit,
    calibration and evaluation parts' clean images, the fit part's noisy copies are label 0 next to its
    clean images when every supervised detector is fitted (and in its cross-validation folds, with their
    source image), the evaluation part's join the clean negatives of every row's AUROC and TPR, and the
    calibration part's join the clean images the thresholds are set on; never scored as attacks (they
    cannot also be in ``attacks``). The other protocols keep clean negatives. Empty (the default): off.
    ``probes``: with ``k > 0``, the deep check (:mod:`nad_guard.probes`): every protocol but ``adaptive``
    also reports ``nad-guard[deep k=K]``, nad-guard's detector (same method, encoding and training data)
    on its row plus the probe columns of :meth:`probe_spec` (``probe_transforms``, ``probe_sigma``,
    ``probe_bits``, ``probe_seed``, ``probe_per_layer``, ``probe_per_transform``).

    The adaptive protocol (:mod:`nad_guard.evaluate.adaptive`): ``adaptive_images`` correctly classified
    evaluation images, attacked by ``adaptive_steps`` PGD steps (the suite's ``pgd`` steps when ``None``)
    with each of ``adaptive_objectives`` (:mod:`nad_guard.attacks.adaptive`) at each budget of
    ``adaptive_eps_scales`` times the suite's ``pgd`` ``eps`` (which is always on the grid), with
    ``adaptive_eot`` draws per step for random defences, against each of ``adaptive_targets``
    (:data:`nad_guard.evaluate.adaptive.TARGETS`). Its cost grows with images x steps x objectives x grid
    points, less the images already evaded.
    """

    suite: str = "mnist"
    attacks: Sequence[str] | None = None
    protocols: Sequence[str] = PROTOCOLS
    methods: Sequence[str] = ("logistic", "gboost")
    encodings: Sequence[str] = ("rich", "full")
    primary: tuple[str, str] = ("logistic", "rich")
    select: str = "fixed"
    cv_folds: int = 3
    clean_methods: Sequence[str] = ("knn:summary", "gaussian:rich", "isoforest:rich")
    fpr: float = 0.05
    batch_size: int = 128
    n_resamples: int = 1000
    seed: int = 0
    max_images: int | None = None
    train_images: int = 5000
    adaptive_images: int = 200
    adaptive_steps: int | None = None
    adaptive_objectives: Sequence[str] = ("margin", "sum:1", "sum:10", "hinge:10", "selective")
    adaptive_eps_scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0)
    adaptive_eot: int = 4
    adaptive_targets: Sequence[str] = ("nad-guard", "mahalanobis-lr", "msp", "feature-squeezing")
    device: str = "cpu"
    progress: bool = True
    multipass_baselines: Sequence[str] = ()
    odds_samples: int = 256
    maha_noise: Sequence[float] = ()
    noisy_negatives: Sequence[str] = ()
    encoder: str | None = None  # a fitted NND encoder's directory: its features become the column "nnd-encoder"
    probes: int = 0
    probe_transforms: Sequence[str] = ("noise", "bits", "smooth", "shift")
    probe_sigma: float = 0.01
    probe_bits: int = 5
    probe_seed: int = 0
    probe_per_layer: bool = True
    probe_per_transform: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The settings as a result file records them (the encoder's directory made portable)."""
        from nad_guard.runinfo import portable_path

        d = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(self).items()}
        return d | ({"encoder": portable_path(self.encoder)} if self.encoder is not None else {})

    def probe_spec(self) -> "ProbeSpec":
        """The deep check's :class:`~nad_guard.probes.ProbeSpec` (``k = probes``)."""
        from nad_guard.probes import ProbeSpec

        return ProbeSpec(k=self.probes, transforms=tuple(self.probe_transforms), sigma=self.probe_sigma,
                         bits=self.probe_bits, seed=self.probe_seed, per_layer=self.probe_per_layer,
                         per_transform=self.probe_per_transform)

    def noisy_controls(self, suite: "AttackSuite", attacks: Sequence[str]) -> list[str]:
        """``noisy_negatives``, checked: noise controls of ``suite``, none of them among the scored ``attacks``."""
        names = list(dict.fromkeys(self.noisy_negatives))
        controls = [n for n, a in suite.attacks.items() if a.kind == "noise"]
        if any(n not in controls for n in names):
            raise ValueError(f"noisy negatives {[n for n in names if n not in controls]}: not noise controls of the "
                             f"{suite.name} suite (its controls: {', '.join(controls)})")
        if set(names) & set(attacks):
            raise ValueError(f"{sorted(set(names) & set(attacks))}: a noise control is either scored as an attack "
                             "or counted as a negative, not both")
        return names

    def clean_specs(self) -> list[tuple[str, str]]:
        """``(method, encoding)`` of each of ``clean_methods``, checked."""
        from nad_guard.detectors import CLEAN_ONLY
        from nad_guard.encoding import ENCODINGS

        specs = []
        for spec in self.clean_methods:
            method, enc = clean_spec(spec, self.primary[1])
            if method not in CLEAN_ONLY or enc not in ENCODINGS:
                raise ValueError(f"clean-only detector {spec!r}: expected METHOD or METHOD:ENCODING with METHOD one "
                                 f"of {', '.join(CLEAN_ONLY)} and ENCODING one of {', '.join(ENCODINGS)}")
            specs.append((method, enc))
        if not specs:
            raise ValueError("clean_methods is empty: name at least one clean-only detector")
        return specs


def clean_spec(spec: str, default_encoding: str) -> tuple[str, str]:
    """``(method, encoding)`` of a clean-only detector named ``method`` or ``method:encoding``."""
    method, _, enc = spec.partition(":")
    return method, enc or default_encoding
