"""Detectors that read more than the predicting pass: the columns each needs from the images of every
set of a run, computed while :class:`~nad_guard.evaluate.data.EvalData` streams the images once
(:func:`image_columns`), and kept in :attr:`FeatureSet.extra <nad_guard.evaluate.features.FeatureSet>`.

Each entry is ``name -> fn(x)``: ``x`` a batch ``(B, C, H, W)`` in ``[0, 1]`` on the classifier's device,
the result ``(B, F)`` numbers. The functions may use what :class:`EvalData` has fitted before the parts'
images are read (the classifier's training features ``d.train_base`` and ``d.train_labels``).

The multi-pass baselines (``EvalConfig.multipass_baselines``, unsupervised rows of every protocol):

``feature-squeezing``
    :class:`~nad_guard.baselines.FeatureSqueezing` with the paper's squeezers for the images' channels
    (CIFAR-10's bit-5, median-2, nlm-13-3-2; MNIST's bit-1, median-2): columns = the L1 distance per
    squeezer, score = their max. 3-4 more forward passes per image (the plain one again and one per
    squeezer), plus non-local means.
``odds``
    :class:`~nad_guard.baselines.OddsAreOdd` with the released code's nine noise settings and
    ``EvalConfig.odds_samples`` draws each: columns = ``[pred, noise responses]``; the clean statistics
    are fitted on the fit part's clean (correctly classified) images, the detector-fit images, as the
    paper fits them on clean training images. ``1 + 9 * odds_samples`` more forward passes per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from nad_guard.baselines import FeatureSqueezing, OddsAreOdd
from nad_guard.baselines.squeezing import squeeze_distances
from nad_guard.evaluate.config import MULTIPASS_BASELINES

if TYPE_CHECKING:
    from nad_guard.evaluate.data import EvalData
    from nad_guard.evaluate.features import FeatureSet

ImageColumns = dict[str, Callable[[torch.Tensor], np.ndarray]]


PROBES = "probes"  # the deep check's columns (nad_guard.probes), with EvalConfig.probes > 0
SQUEEZING = "feature-squeezing"  # the squeezers' L1 distances (nad_guard.baselines.FeatureSqueezing)
ENCODER = "nnd-encoder"  # the NND encoder's columns (nad_guard.encoder.encoder_features), with EvalConfig.encoder
ENCODER_ROW = "nad-guard[+nnd-encoder]"  # nad-guard's detector on its row plus the ENCODER columns


def deep_name(k: int) -> str:
    """The row name of nad-guard's deep check with ``k`` probes."""
    return f"nad-guard[deep k={k}]"


def _detectors(d: "EvalData") -> dict[str, Any]:
    """The configured multi-pass detectors, built once per run (kept on ``d``)."""
    if not hasattr(d, "multipass_detectors"):
        cfg = d.cfg
        unknown = sorted(set(cfg.multipass_baselines) - set(MULTIPASS_BASELINES))
        if unknown:
            raise ValueError(f"unknown multi-pass baselines {unknown}; choose from {', '.join(MULTIPASS_BASELINES)}")
        dets: dict[str, Any] = {}
        for name in cfg.multipass_baselines:
            if name == SQUEEZING:
                dets[name] = FeatureSqueezing().fit(channels=d.paths.classifier.spec.channels)
            else:
                dets[name] = OddsAreOdd(n_samples=cfg.odds_samples, seed=cfg.seed)
        d.multipass_detectors = dets
    return d.multipass_detectors


def image_columns(d: "EvalData") -> ImageColumns:
    """The per-image columns the run's configuration asks for (none by default)."""
    from nad_guard.evaluate.maha_pre import maha_pre_columns

    clf = d.paths.classifier
    cols: ImageColumns = {}
    cols.update(maha_pre_columns(d))  # Mahalanobis with input pre-processing (cfg.maha_noise)
    for name, det in _detectors(d).items():
        if isinstance(det, FeatureSqueezing):
            cols[name] = lambda x, det=det: squeeze_distances(clf, x, det.squeezers_)
        else:
            cols[name] = lambda x, det=det: det.columns(clf, x, batch_size=len(x))
    if d.cfg.encoder is not None:  # NND's gate vector against the class masks and mean encodings (docs/encoder.md)
        from nad_guard.encoder import ArchitectureEncoder, encoder_features
        from nad_guard.hooks import device_of

        enc = ArchitectureEncoder.load(d.cfg.encoder, d.paths.classifier).to(device_of(d.paths.classifier))
        cols[ENCODER] = lambda x: encoder_features(enc, d.paths, x)[0].numpy()
    if d.cfg.probes > 0:  # the deep check's probe columns
        from nad_guard.probes import probe_columns

        spec = d.cfg.probe_spec()
        cols[PROBES] = lambda x: probe_columns(d.paths, x, spec)
    return cols


def multipass_scores(d: "EvalData") -> dict[str, Callable[["FeatureSet"], np.ndarray]]:
    """``name -> score(feature_set)`` of each configured multi-pass baseline (higher = more suspicious),
    fitted where it needs fitting (the Odds' clean statistics on the fit part's clean images)."""
    from nad_guard.evaluate.features import FIT_CLEAN

    out: dict[str, Callable[["FeatureSet"], np.ndarray]] = {}
    for name, det in _detectors(d).items():
        if isinstance(det, OddsAreOdd):
            det.fit_columns(d.features[FIT_CLEAN].extra[name])
        out[name] = lambda fs, det=det, name=name: det.score_columns(fs.extra[name])
    return out


def rule_fields(name: str, d: "EvalData", s: dict[str, np.ndarray]) -> dict[str, Any]:
    """For the Odds row: the share of clean (evaluation), calibration and suspicious images its paper's
    fixed rule flags (z-score above ``Phi^-1(0.999)``), next to the calibrated threshold's figures."""
    det = getattr(d, "multipass_detectors", {}).get(name)
    if not isinstance(det, OddsAreOdd):
        return {}
    return {"paper_rule": {"threshold": round(det.threshold, 4),
                           **{f"flagged_{k}": float(np.mean(v > det.threshold)) for k, v in s.items()}}}
