"""Adversarial examples for evaluating detectors, generated honestly and cached.

Named *suites* hold dataset-appropriate settings for a fixed set of attacks (torchattacks 3.5.1):

==============  ======  =====================================================================
name            norm    what
==============  ======  =====================================================================
``fgsm``        L-inf   one signed-gradient step of size ``eps``
``bim``         L-inf   iterative FGSM, no random start (Kurakin et al.)
``pgd``         L-inf   projected gradient descent with a random start (Madry et al.)
``pgd-l2``      L2      PGD in an L2 ball
``cw-l2``       L2      Carlini-Wagner L2 (unbounded: minimal perturbation that succeeds)
``deepfool``    L2      DeepFool (unbounded; the authors' algorithm, batched: :class:`DeepFool`)
``apgd-ce``     L-inf   Auto-PGD, cross-entropy loss (seeded)
``apgd-dlr``    L-inf   Auto-PGD, difference-of-logits-ratio loss (seeded)
``square``      L-inf   Square attack, score-based black box, bounded queries (seeded)
``noise-linf``  L-inf   negative control: Gaussian noise rescaled to L-inf size ``eps``
``noise-l2``    L2      negative control: Gaussian noise rescaled to L2 size ``eps_l2``
==============  ======  =====================================================================

Suites: ``mnist`` (``eps`` 0.3, ``eps_l2`` 2.0), ``cifar10`` (``eps`` 8/255, ``eps_l2`` 0.5) and
``fast`` (few steps, for tests); ``lee2018`` the settings of Lee et al. 2018's released code (FGSM 0.05, BIM
6 x 0.01, their DeepFool and CW-L2, Gaussian noise as their noisy images; docs/lee2018.md). :func:`get_suite` takes other ``eps`` / ``eps_l2`` values and
per-attack ``overrides``; step sizes scale with ``eps``.

:func:`generate` follows the usual evaluation rules: only images the classifier gets right are
attacked (that is the clean set), only successful adversarial examples are kept (prediction
changed; the noise controls keep every sample and report their "success" rate as it is), bounded
attacks are projected to their ball and to ``[0, 1]`` and checked. Images are float32 in
``[0, 1]`` throughout: quantising to ``uint8`` or storing float16 would change the attack.
Results are cached on disk as safetensors + JSON (no pickle), keyed by the model's weights and
name, the attack settings, the batch size and the data (a hash of the images and labels), so a
rerun loads instead of regenerating. Stochastic attacks are seeded per batch
(``seed + batch index``) inside a forked RNG, so results are reproducible and the caller's RNG
state is untouched. Results depend on ``batch_size`` (random draws, CW's early stop), which is
therefore part of the key.

The package's modules, one idea each (import the names from ``nad_guard.attacks``):
:mod:`~nad_guard.attacks.suites` (settings: :class:`AttackSpec`, :class:`AttackSuite`,
:func:`get_suite`), :mod:`~nad_guard.attacks.implementations` (the attack classes written here and
:func:`build_attack`), :mod:`~nad_guard.attacks.cache` (cache keys and the cache directory),
:mod:`~nad_guard.attacks.results` (:class:`AttackResult`, its cache entry, :func:`stats_table`) and
:mod:`~nad_guard.attacks.generation` (:func:`generate`, :func:`generate_suite`); and
:mod:`~nad_guard.attacks.adaptive`, the adaptive attack on a whole defence (:class:`AdaptiveTarget`,
:func:`evasion_curve`: PGD with EOT and BPDA through the detector).
"""

from nad_guard.attacks.adaptive import (OBJECTIVES, AdaptiveTarget, EvasionCurve, adaptive_pgd, budget_at, centred,
                                        eot_gradient, evasion_curve, straight_through)
from nad_guard.attacks.cache import CACHE_FORMAT, cache_key, data_hash, default_cache_dir, model_hash
from nad_guard.attacks.generation import PROJECTION_TOL, generate, generate_suite
from nad_guard.attacks.implementations import CWL2, KINDS, DeepFool, GaussianNoise, build_attack
from nad_guard.attacks.results import AttackResult, AttackStats, stats_table
from nad_guard.attacks.suites import NOISE_ATTACKS, SUITES, AttackSpec, AttackSuite, get_suite

__all__ = [
    "CACHE_FORMAT", "CWL2", "OBJECTIVES", "AdaptiveTarget", "EvasionCurve", "adaptive_pgd", "budget_at", "centred",
    "eot_gradient", "evasion_curve", "straight_through", "KINDS", "NOISE_ATTACKS", "PROJECTION_TOL", "SUITES",
    "AttackResult", "AttackSpec", "AttackStats", "AttackSuite", "DeepFool", "GaussianNoise",
    "build_attack", "cache_key", "data_hash", "default_cache_dir", "generate", "generate_suite", "get_suite",
    "model_hash", "stats_table",
]
