"""The detection evaluation harness: nad-guard and the baselines under one honest protocol.

Splits (as :func:`nad_guard.holdout.holdout_splits`): the test set is divided, seeded and
stratified, into a *detector-fit* part (40%), a *calibration* part (20%, clean only: thresholds)
and an *evaluation* part (40%). Clean sets hold only images the classifier gets right; adversarial
sets hold only successful attacks on those clean images (:func:`nad_guard.attacks.generate`, cached
on disk). Detectors learn on the fit part and are judged on the evaluation part, so their train and
test images are disjoint; every detector's threshold is the one that flags 5% of the calibration
part's clean scores (:func:`nad_guard.metrics.threshold_at_fpr`). Baselines get exactly the same
splits, the same training data and the same threshold rule. Scores: **higher = more suspicious**.

Unsupervised parts are learned from the classifier's training images, as nad-guard's masks are:
the class Gaussians of Mahalanobis, the LID reference set and the deep-kNN neighbours (a seeded,
stratified sample of at most ``train_images``). Supervised parts (nad-guard's detector, the
logistic regressions of Mahalanobis-LR and LID-LR) learn on the fit part only.

Protocols (``PROTOCOLS``):

``seen``
    per attack: train on the fit part's clean images + that attack's adversarials, test on the
    evaluation part's clean images + that attack's adversarials.
``unseen``
    leave one attack out: train on the other attacks, test on the left-out one.
``fgsm-only``
    train on FGSM only, test on every other attack.
``clean-only``
    no adversarial data at all: nad-guard's clean-only detectors (``EvalConfig.clean_methods``)
    against MSP, Energy, unsupervised Mahalanobis (last layer), LID (last layer) and deep kNN.
``mispredictions``
    natural errors: positives are the evaluation part's misclassified clean images, negatives its
    correctly classified ones. nad-guard as deployed (the primary method trained on all attacks of
    the fit part and the fit part's natural mispredictions, as ``nad-guard fit-detector`` does), the
    same trained on the attacks only, its clean-only detector, and one trained on the fit part's own
    mispredictions only when it holds at least ``MIN_MISPREDICTIONS`` of them.
``adaptive``
    a white-box L-inf PGD (the suite's ``pgd`` budget) that lowers the classifier's margin and the
    detector's score at once, through differentiable path features
    (:meth:`PathModel.pooled_forward` and :func:`soft_detector_matrix`, a smooth surrogate of the
    detector input) and a differentiable stand-in for the detector (the logistic detector itself,
    or a logistic detector fitted on the same data for a gradient-boosting one). Reported: the share
    of attacked images for which, for some lambda (0, plain PGD, included) and some iterate, the image
    is misclassified *and* not flagged by the real detector at its calibrated threshold, next to the
    same figure for Mahalanobis-LR (attacked through its exact, differentiable distance) and for plain
    PGD alone.

Which supervised detector is "nad-guard" (``EvalConfig.select``): ``fixed``, the configured primary
method and encoding; ``cv``, per training task (each seen attack, each left-out attack, the deployed
detector of the mispredictions and adaptive protocols), the candidate method x encoding with the best
cross-validated AUROC on that task's training data (:func:`nad_guard.detectors.cv_groups`: folds hold
out whole attacks when the task trains on at least as many attacks as there are folds, else whole
source images, so no fold is scored on perturbed copies of its own training images). Both choices use
the fit part only;
the other candidates are reported as ``nad-guard[method,encoding]`` rows either way.

Outputs (:func:`write_outputs`): ``results.md`` (tables), ``results.json`` (everything, with the
configuration and timing) and ``roc_<protocol>.png`` plots.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nad_guard.attacks import AttackResult, generate, get_suite
from nad_guard.baselines import LID, MSP, DeepKNN, Energy, Features, Mahalanobis, combiner, default_layers
from nad_guard.calibration import CalibrationWarning
from nad_guard.calibration import fpr_guarantee as calibration_guarantee
from nad_guard.data import ImageSet, stratified_split
from nad_guard.detectors import PathDetector
from nad_guard.hooks import capture
from nad_guard.holdout import correct_subset, holdout_provenance
from nad_guard.guard import detector_matrix, guard_matrix, path_inputs
from nad_guard.metrics import evaluate as evaluate_scores
from nad_guard.metrics import markdown_table, plot_roc, threshold_at_fpr, write_json
from nad_guard.paths import LAYER_FEATURES, PathModel
from nad_guard.provenance import compare as compare_provenance
from nad_guard.provenance import summary as provenance_summary
from nad_guard.runinfo import machine_info

SELECT = ("fixed", "cv")
PROTOCOLS = ("seen", "unseen", "fgsm-only", "clean-only", "mispredictions", "adaptive")
MIN_MISPREDICTIONS = 10
UNSUPERVISED_BASELINES = ("msp", "energy", "mahalanobis", "lid", "deep-knn")
SUPERVISED_BASELINES = ("mahalanobis-lr", "lid-lr")


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
    adaptive_lambdas: Sequence[float] = (1.0, 10.0)
    device: str = "cpu"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(self).items()}

    def clean_specs(self) -> list[tuple[str, str]]:
        """``(method, encoding)`` of each of ``clean_methods``, checked."""
        from nad_guard.detectors import CLEAN_ONLY
        from nad_guard.guard import ENCODINGS

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


# --------------------------------------------------------------------------- features of one image set

@dataclass
class FeatureSet:
    """Everything the detectors read from one image set (one forward pass per batch)."""

    path: dict[str, np.ndarray]   # encoding -> (N, F) detector input
    base: Features                 # baselines' pooled activations and logits
    labels: np.ndarray             # (N,) true labels

    def __len__(self) -> int:
        return len(self.labels)


def compute_features(paths: PathModel, images: torch.Tensor | ImageSet, labels: Any, encodings: Sequence[str],
                     layers: Sequence[str], batch_size: int = 128, progress: bool = False,
                     desc: str = "features") -> FeatureSet:
    """Path encodings and baseline features of ``images`` (float ``(N, C, H, W)`` in ``[0, 1]``, or an
    :class:`ImageSet`, converted to float one batch at a time), streamed in batches: the memory of
    the passes is bounded by ``batch_size``; what is kept is ``O(N)`` per-image feature rows."""
    from tqdm.auto import tqdm

    clf = paths.classifier
    device = next(iter(clf.buffers())).device
    enc: dict[str, list[np.ndarray]] = {e: [] for e in encodings}
    acts: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    logits = []
    with capture(clf, layers) as store:
        for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            store.clear()
            x = images.float(s, s + batch_size) if isinstance(images, ImageSet) else images[s:s + batch_size]
            f, pooled = path_inputs(paths, x.to(device), batch_size=batch_size)
            for e in encodings:
                enc[e].append(detector_matrix(f, e, pooled))
            for n in layers:
                acts[n].append(store[n].cpu().numpy())
            logits.append(f.logits.float().numpy())
    if not logits:
        raise ValueError(f"{desc}: no images")
    return FeatureSet({e: np.concatenate(v) for e, v in enc.items()},
                      Features({n: np.concatenate(v) for n, v in acts.items()}, np.concatenate(logits)),
                      np.asarray(labels, dtype=np.int64))


def _concat(sets: Sequence[FeatureSet]) -> FeatureSet:
    return FeatureSet({e: np.concatenate([s.path[e] for s in sets]) for e in sets[0].path},
                      Features.concat([s.base for s in sets]), np.concatenate([s.labels for s in sets]))


# --------------------------------------------------------------------------- differentiable surrogate

def soft_detector_matrix(pooled: Sequence[torch.Tensor], logits: torch.Tensor, masks: Sequence[torch.Tensor],
                         stats: Sequence[Any], encoding: str = "rich", *, tau: float = 0.01,
                         top_k: float = 0.25) -> torch.Tensor:
    """A smooth surrogate of :func:`nad_guard.guard.detector_matrix` ``(N, F)`` for attacks.

    Same columns in the same order. The continuous features (``mass_share``, ``margin``, the
    confidence signals and the rich encoding's ``s_k - s_p``) are exact; the step functions are
    replaced: ``nearest_is_pred`` by ``sigmoid(margin / tau)``, ``pred_rank`` by
    ``1 + sum_{k != p} sigmoid((s_k - s_p) / tau)``, ``agree_fraction`` by their mean; ``topk_overlap``
    is the exact value without gradient. The predicted class ``p`` is the current argmax. ``stats``: the
    path model's :class:`~nad_guard.paths.ChannelStats` per gate point.
    """
    from nad_guard.paths import path_features

    parts = path_features(pooled, logits, masks, stats, top_k=top_k)
    s, pred = parts["class_scores"], parts["pred"]
    idx = pred.view(-1, 1, 1).expand(-1, s.shape[1], 1)
    sp = s.gather(2, idx)
    diff = s - sp                                                   # (N, L, K), 0 at k = p
    soft_is_pred = torch.sigmoid(parts["margin"] / tau)
    others = torch.ones_like(s).scatter(2, idx, 0.0)
    soft_rank = 1 + (torch.sigmoid(diff / tau) * others).sum(2)
    per_layer = {"mass_share": parts["mass_share"], "topk_overlap": parts["topk_overlap"].detach(),
                 "margin": parts["margin"], "nearest_is_pred": soft_is_pred, "pred_rank": soft_rank,
                 "centroid_dist": parts["centroid_dist"], "centroid_margin": parts["centroid_margin"]}
    cols = []
    for j in range(s.shape[1]):
        cols += [per_layer[f][:, j] for f in LAYER_FEATURES]
    cols += [soft_is_pred.mean(1), parts["msp"], parts["softmax_margin"], parts["energy"], parts["logit_margin"]]
    out = [torch.stack(cols, 1)]
    if encoding in ("rich", "full"):
        out.append(diff.flatten(1))
    elif encoding != "summary":
        raise ValueError(f"no smooth surrogate for encoding {encoding!r}")
    if encoding == "full":
        for a in pooled:
            a = a.abs()
            norm = a.norm(dim=1, keepdim=True)
            out += [torch.log(norm + 1e-12), a / norm.clamp_min(1e-12)]
    return torch.cat(out, 1)


def _linear(pipeline: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(mean, scale, coef, intercept)`` of a StandardScaler + LogisticRegression pipeline."""
    scaler, lr = pipeline.steps[0][1], pipeline.steps[-1][1]
    return scaler.mean_, scaler.scale_, lr.coef_.ravel(), float(lr.intercept_[0])


def _torch_linear(pipeline: Any, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, scale, coef, b = _linear(pipeline)
    m, s, w = (torch.as_tensor(v, dtype=dtype, device=device) for v in (mean, scale, coef))
    return lambda x: ((x - m) / s) @ w + b


# --------------------------------------------------------------------------- the run

class EvalData:
    """Splits, attacks and features of one run (computed once, shared by the protocols)."""

    def __init__(self, paths: PathModel, train: ImageSet, test: ImageSet, cfg: EvalConfig, cache_dir: Path | None,
                 log: Callable[[str], None]):
        from tqdm.auto import tqdm

        self.cfg, self.paths = cfg, paths
        clf = paths.classifier
        dev = torch.device(cfg.device)
        clf.to(dev)
        (fit, cal, ev), self.provenance = holdout_provenance(test, test.name.split("/", 1)[0], cfg.max_images,
                                                             cfg.seed)
        self.splits = {"fit": fit, "calibration": cal, "evaluation": ev}
        self.clean = {k: correct_subset(paths, v) for k, v in self.splits.items()}
        suite = get_suite(cfg.suite, seed=cfg.seed)
        self.suite = suite
        self.attacks = list(cfg.attacks or [a for a in suite.names if not a.startswith("noise")])
        self.layers = default_layers(clf)
        enc = sorted(set(cfg.encodings) | {cfg.primary[1]} | {e for _, e in cfg.clean_specs()})
        self.encodings = enc

        def feats(images: torch.Tensor, labels: Any, desc: str) -> FeatureSet:
            return compute_features(paths, images, labels, enc, self.layers, cfg.batch_size, cfg.progress, desc)

        self.f: dict[str, FeatureSet] = {}
        feature_seconds = 0.0
        t0 = time.time()
        for split in ("fit", "calibration", "evaluation"):
            c = self.clean[split]
            self.f[f"{split}:clean"] = feats(c, c.labels, f"{split} clean")
        # rows that come from one source image share a group (for cross-validation on the fit part)
        self.groups: dict[str, np.ndarray] = {"fit:clean": np.arange(len(self.clean["fit"]))}
        self.n_wrong: dict[str, int] = {}
        for split, images in (("evaluation", ev), ("fit", fit)):
            wrong = self._wrong(images)
            self.n_wrong[split] = len(wrong)
            if len(wrong):
                w = images.subset(wrong)
                self.f[f"{split}:wrong"] = feats(w, w.labels, f"{split} mispredicted")
                if split == "fit":
                    self.groups["fit:wrong"] = len(self.clean["fit"]) + np.arange(len(wrong))
        feature_seconds += time.time() - t0
        # one attack at a time: generate (or read from the cache), take its features, drop its images,
        # so the images held never exceed one attack's on one split
        self.attack_seconds = 0.0
        self.adv: dict[str, dict[str, AttackResult]] = {"fit": {}, "evaluation": {}}
        bar = tqdm([(s, a) for s in ("fit", "evaluation") for a in self.attacks], desc="attacks",
                   disable=not cfg.progress)
        for split, attack in bar:
            bar.set_postfix_str(f"{split}:{attack}")
            t0 = time.time()
            r = generate(clf, self.clean[split], attack=attack, suite=suite, batch_size=cfg.batch_size, device=dev,
                         cache_dir=cache_dir, progress=cfg.progress)
            t1 = time.time()
            self.attack_seconds += t1 - t0
            if len(r):
                self.f[f"{split}:{attack}"] = feats(r.adv_images, r.labels, f"{split} {attack}")
                if split == "fit":
                    self.groups[f"fit:{attack}"] = r.indices.numpy()
            self.adv[split][attack] = replace(r, adv_images=r.adv_images[:0])
            feature_seconds += time.time() - t1
        log(f"attacks ready in {self.attack_seconds:.0f} s")
        t0 = time.time()
        # the classifier's training images for the unsupervised parts of the baselines
        if len(train) > cfg.train_images:
            _, keep = stratified_split(train.labels.numpy(), cfg.train_images, seed=cfg.seed)
            train = train.subset(keep, f"{train.name}[{cfg.train_images}]")
        self.train_base = compute_features(paths, train, train.labels, enc[:1], self.layers, cfg.batch_size,
                                           cfg.progress, "train").base
        self.train_labels = train.labels.numpy()
        self.feature_seconds = feature_seconds + time.time() - t0
        log(f"features ready in {self.feature_seconds:.0f} s")
        self.usable = [a for a in self.attacks if f"fit:{a}" in self.f and f"evaluation:{a}" in self.f]
        self._choices: dict[tuple[str, ...], tuple[tuple[str, str], dict[str, float]]] = {}

    def training_set(self, train_keys: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Labels (0 for ``fit:clean``, 1 for the rest) of ``train_keys``'s rows, and each suspicious
        block's source-image indices."""
        y = np.concatenate([np.zeros(len(self.f[train_keys[0]]))] + [np.ones(len(self.f[k])) for k in train_keys[1:]])
        return y, [self.groups[k] for k in train_keys[1:]]

    def choose(self, train_keys: Sequence[str]) -> tuple[tuple[str, str], dict[str, Any]]:
        """The ``(method, encoding)`` standing for nad-guard when trained on ``train_keys`` (the first being
        ``fit:clean``), and the cross-validated AUROC of every candidate with how the folds were grouped
        (empty when ``select="fixed"``)."""
        cfg = self.cfg
        if cfg.select == "fixed":
            return tuple(cfg.primary), {}
        key = tuple(train_keys)
        if key not in self._choices:
            from nad_guard.detectors import cv_groups, select_by_cv

            y, blocks = self.training_set(train_keys)
            groups, by = cv_groups(len(self.f[train_keys[0]]), blocks, cfg.cv_folds)
            cands = {f"{m},{e}": (m, np.vstack([self.f[k].path[e] for k in train_keys]))
                     for e in cfg.encodings for m in cfg.methods}
            best, cv = select_by_cv(cands, y, groups, cfg.cv_folds, cfg.seed)
            m, e = best.split(",")
            self._choices[key] = ((m, e), {"folds_by": by, "auroc": cv})
        return self._choices[key]

    def _wrong(self, images: ImageSet) -> np.ndarray:
        clf = self.paths.classifier
        dev = next(iter(clf.buffers())).device
        with torch.no_grad():
            pred = torch.cat([clf(x.to(dev)).argmax(1).cpu() for x, _ in images.batches(self.cfg.batch_size)])
        return (pred != images.labels).nonzero().flatten().numpy()


class _Baselines:
    """Unsupervised baselines fitted once; per-set scores and layer scores cached."""

    def __init__(self, d: EvalData, seed: int):
        self.d = d
        self.msp, self.energy = MSP(), Energy()
        self.maha = Mahalanobis(combine="last").fit_features(d.train_base, d.train_labels)
        self.lid = LID(combine="last", random_state=seed).fit_features(d.train_base)
        self.knn = DeepKNN(random_state=seed).fit_features(d.train_base, d.train_labels)
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def layer_scores(self, which: str, key: str) -> np.ndarray:
        k = (which + ":layers", key)
        if k not in self._cache:
            det = self.maha if which == "mahalanobis" else self.lid
            self._cache[k] = det.layer_scores(self.d.f[key].base)
        return self._cache[k]

    def score(self, name: str, key: str) -> np.ndarray:
        k = (name, key)
        if k not in self._cache:
            det = {"msp": self.msp, "energy": self.energy, "mahalanobis": self.maha, "lid": self.lid,
                   "deep-knn": self.knn}[name]
            self._cache[k] = det.score_features(self.d.f[key].base)
        return self._cache[k]


def metrics_row(detector: str, attack: str, clean: np.ndarray, susp: np.ndarray, cal: np.ndarray,
                 cfg: EvalConfig) -> dict[str, Any]:
    m = evaluate_scores(clean, susp, cal, fpr=cfg.fpr, n_resamples=cfg.n_resamples, seed=cfg.seed)
    return {"detector": detector, "attack": attack, **m.to_dict()}


def _nad_name(method: str, encoding: str, cfg: EvalConfig) -> str:
    """Row name of a supervised candidate: 'nad-guard' for the fixed primary; under ``select="cv"``
    every candidate is a variant and 'nad-guard' is a copy of the chosen one's scores."""
    if cfg.select == "fixed" and (method, encoding) == tuple(cfg.primary):
        return "nad-guard"
    return f"nad-guard[{method},{encoding}]"


def _supervised_protocol(d: EvalData, b: _Baselines, cfg: EvalConfig, tasks: list[tuple[str, list[str]]],
                         progress_desc: str, keep_scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Each task ``(test_attack, train_attacks)``: fit every supervised detector on the fit part's clean
    images + the train attacks' adversarials, score the evaluation part."""
    from tqdm.auto import tqdm

    rows = []
    for test_attack, train_attacks in tqdm(tasks, desc=progress_desc, disable=not cfg.progress):
        train_keys = ["fit:clean"] + [f"fit:{a}" for a in train_attacks]
        y = d.training_set(train_keys)[0]
        test = {"clean": "evaluation:clean", "adv": f"evaluation:{test_attack}", "cal": "calibration:clean"}
        scores: dict[str, dict[str, np.ndarray]] = {}
        for enc in cfg.encodings:
            X = np.vstack([d.f[k].path[enc] for k in train_keys])
            for method in cfg.methods:
                det = PathDetector(method, random_state=cfg.seed).fit(X, y)
                scores[_nad_name(method, enc, cfg)] = {r: det.score_samples(d.f[k].path[enc])
                                                       for r, k in test.items()}
        (cm, ce), cv = d.choose(train_keys)
        if cfg.select == "cv":
            scores = {"nad-guard": scores[_nad_name(cm, ce, cfg)], **scores}
        for which in ("mahalanobis", "lid"):
            L = np.vstack([b.layer_scores(which, k) for k in train_keys])
            comb = combiner(1.0).fit(L, y)
            scores[f"{which}-lr"] = {r: comb.decision_function(b.layer_scores(which, k)) for r, k in test.items()}
        for name in ("msp", "energy", "deep-knn"):
            scores[name] = {r: b.score(name, k) for r, k in test.items()}
        for det_name, s in scores.items():
            rows.append({**metrics_row(det_name, test_attack, s["clean"], s["adv"], s["cal"], cfg),
                         "trained_on": "+".join(train_attacks),
                         **({"selected": f"{cm},{ce}", "cv": cv} if det_name == "nad-guard" else {})})
        keep_scores[test_attack] = scores
    return rows


def _clean_only(d: EvalData, b: _Baselines, cfg: EvalConfig, keep_scores: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    keys = {"clean": "evaluation:clean", "cal": "calibration:clean"}
    dets = {}
    for i, (method, enc) in enumerate(cfg.clean_specs()):
        det = PathDetector(method, random_state=cfg.seed).fit(d.f["fit:clean"].path[enc])
        name = "nad-guard" if i == 0 else f"nad-guard[{method},{enc}]"
        dets[name] = lambda k, det=det, enc=enc: det.score_samples(d.f[k].path[enc])
    for name in UNSUPERVISED_BASELINES:
        dets[name] = lambda k, name=name: b.score(name, k)
    for attack in d.usable:
        scores = {}
        for name, fn in dets.items():
            s = {r: fn(k) for r, k in {**keys, "adv": f"evaluation:{attack}"}.items()}
            scores[name] = s
            rows.append({**metrics_row(name, attack, s["clean"], s["adv"], s["cal"], cfg), "trained_on": "clean"})
        keep_scores[attack] = scores
    return rows


def _deployed_keys(d: EvalData) -> list[str]:
    """The deployed detector's training data: the fit part's clean images, every attack on them and the
    fit part's natural mispredictions (as ``nad-guard fit-detector`` trains it)."""
    return (["fit:clean"] + [f"fit:{a}" for a in d.usable] + (["fit:wrong"] if "fit:wrong" in d.f else []))


def _mispredictions(d: EvalData, b: _Baselines, cfg: EvalConfig, keep_scores: dict[str, Any]) -> list[dict[str, Any]]:
    if "evaluation:wrong" not in d.f or len(d.f["evaluation:wrong"]) == 0:
        return []
    keys = {"clean": "evaluation:clean", "adv": "evaluation:wrong", "cal": "calibration:clean"}
    dets: dict[str, Callable[[str], np.ndarray]] = {}
    attack_keys = ["fit:clean"] + [f"fit:{a}" for a in d.usable]
    deployed_keys = _deployed_keys(d)
    (method, enc), cv = d.choose(deployed_keys)
    for name, train_keys in (("nad-guard", deployed_keys), (f"nad-guard[{method},{enc},attacks only]", attack_keys)):
        X = np.vstack([d.f[k].path[enc] for k in train_keys])
        y = d.training_set(train_keys)[0]
        det = PathDetector(method, random_state=cfg.seed).fit(X, y)
        dets[name] = lambda k, det=det: det.score_samples(d.f[k].path[enc])
    cm, ce = cfg.clean_specs()[0]
    clean_det = PathDetector(cm, random_state=cfg.seed).fit(d.f["fit:clean"].path[ce])
    dets[f"nad-guard[{cm},{ce}]"] = lambda k: clean_det.score_samples(d.f[k].path[ce])
    if d.n_wrong["fit"] >= MIN_MISPREDICTIONS:
        Xm = np.vstack([d.f["fit:clean"].path[enc], d.f["fit:wrong"].path[enc]])
        ym = np.r_[np.zeros(len(d.f["fit:clean"])), np.ones(len(d.f["fit:wrong"]))]
        mis_det = PathDetector(method, random_state=cfg.seed).fit(Xm, ym)
        dets[f"nad-guard[{method},{enc},on-mispredictions]"] = lambda k: mis_det.score_samples(d.f[k].path[enc])
    for name in UNSUPERVISED_BASELINES:
        dets[name] = lambda k, name=name: b.score(name, k)
    rows, scores = [], {}
    for name, fn in dets.items():
        s = {r: fn(k) for r, k in keys.items()}
        scores[name] = s
        trained_on = {"nad-guard": "all attacks + fit mispredictions"}.get(name, "all attacks" if "attacks only" in name else "")
        rows.append({**metrics_row(name, "mispredictions", s["clean"], s["adv"], s["cal"], cfg),
                     "trained_on": trained_on,
                     **({"selected": f"{method},{enc}", "cv": cv} if name == "nad-guard" else {})})
    keep_scores["mispredictions"] = scores
    return rows


# --------------------------------------------------------------------------- adaptive attack

def _adaptive_pgd(clf: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, surrogate: Callable, real_flag: Callable,
                  eps: float, alpha: float, steps: int, lam: float, kappa: float, seed: int) -> torch.Tensor:
    """L-inf PGD minimising ``clamp(z_y - max_{k!=y} z_k, -kappa) + lam * surrogate(x)``; returns, per
    image, whether some iterate (after projection) is misclassified and not flagged by ``real_flag``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0) * eps).clamp(0, 1)
    success = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    for step in range(steps + 1):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits, det = surrogate(x)
            zy = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
            loss = (zy - other).clamp_min(-kappa) + lam * det
            (grad,) = torch.autograd.grad(loss.sum(), x)
        x = x.detach()
        with torch.no_grad():
            wrong = logits.detach().argmax(1) != y
            if wrong.any():
                idx = wrong.nonzero().flatten()
                ok = ~real_flag(x[idx])
                success[idx[ok]] = True
        if step == steps:
            break
        x = torch.min(torch.max(x - alpha * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return success


def _adaptive(d: EvalData, b: _Baselines, cfg: EvalConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Adaptive white-box attack on the deployed nad-guard detector and on Mahalanobis-LR."""
    paths, clf = d.paths, d.paths.classifier
    dev = next(iter(clf.buffers())).device
    spec = d.suite["pgd"]
    if spec.norm != "Linf":
        raise ValueError("the adaptive attack uses the suite's L-inf pgd budget")
    eps, alpha = float(spec.eps), float(spec.params["alpha"])
    steps = int(cfg.adaptive_steps or spec.params["steps"])
    # the detector as deployed: all attacks and the natural mispredictions of the fit part
    train_keys = _deployed_keys(d)
    (method, enc), _ = d.choose(train_keys)
    y = d.training_set(train_keys)[0]
    X = np.vstack([d.f[k].path[enc] for k in train_keys])
    real = PathDetector(method, random_state=cfg.seed).fit(X, y)
    with warnings.catch_warnings():  # the calibration's bounds are in the results' "calibration"
        warnings.simplefilter("ignore", CalibrationWarning)
        thr = real.infer_threshold(d.f["calibration:clean"].path[enc], cfg.fpr).threshold_  # the guard's own rule
    surrogate_det = real if method == "logistic" else PathDetector("logistic", random_state=cfg.seed).fit(X, y)
    lin = _torch_linear(surrogate_det.estimator_, torch.float64, dev)
    masks = [paths.masks_[n].to(dev) for n in paths.layer_names_]
    stats = [paths.stats_[n].to(dev) for n in paths.layer_names_]

    def nad_surrogate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = paths.pooled_forward(x)
        feats = soft_detector_matrix([p.double() for p in pooled], logits.double(), masks, stats, enc)
        return logits, lin(feats)

    def nad_flag(x: torch.Tensor) -> torch.Tensor:
        s = real.score_samples(guard_matrix(paths, x, enc, batch_size=len(x))[1])
        return torch.as_tensor(s > thr, device=x.device)

    # Mahalanobis-LR trained on the same data; its distance is differentiable
    L = np.vstack([b.layer_scores("mahalanobis", k) for k in train_keys])
    comb = combiner(1.0).fit(L, y)
    m_thr = threshold_at_fpr(comb.decision_function(b.layer_scores("mahalanobis", "calibration:clean")), cfg.fpr)
    m_lin = _torch_linear(comb, torch.float64, dev)
    maha = b.maha

    def maha_decision(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture(clf, maha.layers_, detach=False) as store:
            logits = clf(x)
            dist = torch.stack([maha.min_distance(store[n].double(), n) for n in maha.layers_], 1)
        return logits, m_lin(dist)

    def maha_flag(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return maha_decision(x)[1] > m_thr

    clean = d.clean["evaluation"]
    n = min(cfg.adaptive_images, len(clean))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(clean), n, replace=False))
    x_all, y_all = clean.float()[pick], clean.labels[pick]
    out: dict[str, Any] = {"images": n, "detector": f"{method},{enc}", "eps": eps, "alpha": alpha, "steps": steps, "norm": "Linf",
                           "lambdas": list(cfg.adaptive_lambdas), "kappa": 1.0, "detectors": {}}
    for name, surrogate, flag, threshold in (("nad-guard", nad_surrogate, nad_flag, thr),
                                             ("mahalanobis-lr", maha_decision, maha_flag, m_thr)):
        t0 = time.time()
        per_lam, any_success = {}, torch.zeros(n, dtype=torch.bool)
        for lam in (0.0, *cfg.adaptive_lambdas):
            succ = []
            for s in range(0, n, cfg.batch_size):
                xb, yb = x_all[s:s + cfg.batch_size].to(dev), y_all[s:s + cfg.batch_size].to(dev)
                succ.append(_adaptive_pgd(clf, xb, yb, surrogate, flag, eps, alpha, steps, lam, 1.0,
                                          cfg.seed + s).cpu())
            succ = torch.cat(succ)
            per_lam[str(lam)] = float(succ.float().mean())
            any_success |= succ  # the attacker may pick any lambda per image, plain PGD (0) included
        out["detectors"][name] = {
            "threshold": threshold,
            "plain_pgd_evades": per_lam["0.0"],  # lam 0: the classifier-only attack, same budget
            "adaptive_evades": float(any_success.float().mean()),
            "per_lambda": per_lam, "seconds": round(time.time() - t0, 1),
            "surrogate": ("the detector itself" if name == "mahalanobis-lr" or method == "logistic"
                          else f"logistic detector on the same data and encoding ({enc})")}
        log(f"adaptive {name}: evades {out['detectors'][name]['adaptive_evades']:.3f} "
            f"(plain PGD {per_lam['0.0']:.3f})")
    return out


# --------------------------------------------------------------------------- entry points

def run_evaluation(paths: PathModel, train: ImageSet, test: ImageSet, cfg: EvalConfig | None = None, *,
                   cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                   guard_provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the protocols of ``cfg`` (see the module docstring) and return a JSON-ready result dict with
    ``rows`` (one per protocol, detector and attack), ``summary`` (mean AUROC per detector and protocol),
    ``attacks`` (per split: success rate, mean perturbation, time), ``adaptive``, ``config``, ``machine``,
    ``provenance`` (which images each part holds, by content hash; with ``guard_provenance``, the record of
    the artifact's guard, whether they are its detector's parts: :func:`nad_guard.provenance.compare`)
    and ``seconds``. ``scores`` (kept for the ROC plots) is not JSON and is dropped by :func:`write_outputs`."""
    cfg = cfg or EvalConfig()
    log = log or (lambda _m: None)
    unknown = set(cfg.protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if cfg.select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {cfg.select!r}")
    if cfg.select == "cv" and cfg.cv_folds < 2:
        raise ValueError(f"cv_folds must be at least 2, got {cfg.cv_folds}")
    cfg.clean_specs()
    t_start = time.time()
    machine_start = machine_info()
    d = EvalData(paths, train, test, cfg, Path(cache_dir) if cache_dir is not None else None, log)
    t0 = time.time()
    b = _Baselines(d, cfg.seed)
    log(f"baselines fitted in {time.time() - t0:.0f} s")
    rows: list[dict[str, Any]] = []
    scores: dict[str, Any] = {}
    timings: dict[str, float] = {"attacks": round(d.attack_seconds, 1), "features": round(d.feature_seconds, 1)}
    atk = d.usable
    for protocol in cfg.protocols:
        t0 = time.time()
        keep: dict[str, Any] = {}
        if protocol == "seen":
            part = _supervised_protocol(d, b, cfg, [(a, [a]) for a in atk], "seen", keep)
        elif protocol == "unseen":
            part = _supervised_protocol(d, b, cfg, [(a, [o for o in atk if o != a]) for a in atk if len(atk) > 1],
                                        "unseen", keep)
        elif protocol == "fgsm-only":
            part = (_supervised_protocol(d, b, cfg, [(a, ["fgsm"]) for a in atk if a != "fgsm"], "fgsm-only", keep)
                    if "fgsm" in atk else [])
        elif protocol == "clean-only":
            part = _clean_only(d, b, cfg, keep)
        elif protocol == "mispredictions":
            part = _mispredictions(d, b, cfg, keep)
        else:
            continue
        rows += [{"protocol": protocol, **r} for r in part]
        scores[protocol] = keep
        timings[protocol] = round(time.time() - t0, 1)
        log(f"{protocol}: {len(part)} rows in {timings[protocol]:.0f} s")
    adaptive = None
    if "adaptive" in cfg.protocols and "pgd" in d.suite.names:
        t0 = time.time()
        adaptive = _adaptive(d, b, cfg, log)
        timings["adaptive"] = round(time.time() - t0, 1)
    attacks = {split: {a: {**r.stats.to_dict(), "from_cache": r.from_cache} for a, r in res.items()}
               for split, res in d.adv.items()}
    paths.classifier.cpu()
    return {
        "config": cfg.to_dict(), "model": paths.classifier.name,
        "data": {"test": test.name, "test_images": len(test) if cfg.max_images is None else min(cfg.max_images, len(test)),
                 **{f"{k}_images": len(v) for k, v in d.splits.items()},
                 **{f"{k}_clean": len(v) for k, v in d.clean.items()},
                 "evaluation_mispredicted": d.n_wrong["evaluation"], "fit_mispredicted": d.n_wrong["fit"],
                 "baseline_train_images": len(d.train_labels), "baseline_layers": d.layers,
                 "gate_points": paths.layer_names_},
        "attacks": attacks, "rows": rows, "summary": summarize(rows), "adaptive": adaptive,
        "calibration": calibration_guarantee(len(d.clean["calibration"]), cfg.fpr).to_dict(),
        "provenance": {**provenance_summary(d.provenance),
                       **({"guard": compare_provenance(d.provenance, guard_provenance)}
                          if guard_provenance is not None else {})},
        "machine": {"start": machine_start, "end": machine_info()}, "timings": timings,
        "seconds": round(time.time() - t_start, 1), "scores": scores,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per protocol: mean / min AUROC and mean TPR per detector, nad-guard's mean and the best baseline's."""
    out: dict[str, Any] = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        per: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["protocol"] == protocol:
                per.setdefault(r["detector"], []).append(r)
        dets = {k: {"mean_auroc": float(np.mean([r["auroc"] for r in v])),
                    "min_auroc": float(np.min([r["auroc"] for r in v])),
                    "mean_tpr": float(np.mean([r["tpr"] for r in v])), "n": len(v)} for k, v in per.items()}
        base = {k: v for k, v in dets.items() if not k.startswith("nad-guard")}
        best = max(base, key=lambda k: base[k]["mean_auroc"]) if base else None
        out[protocol] = {"detectors": dets, "nad_guard_mean_auroc": dets.get("nad-guard", {}).get("mean_auroc"),
                         "best_baseline": best, "best_baseline_mean_auroc": base[best]["mean_auroc"] if best else None}
    return out


def _pivot(rows: Sequence[dict[str, Any]], protocol: str, metric: str) -> str:
    rs = [r for r in rows if r["protocol"] == protocol]
    attacks = list(dict.fromkeys(r["attack"] for r in rs))
    table = []
    for det in dict.fromkeys(r["detector"] for r in rs):
        row: dict[str, Any] = {"detector": det}
        vals = []
        for r in rs:
            if r["detector"] == det:
                row[r["attack"]] = r[metric]
                vals.append(r[metric])
        if len(attacks) > 1:
            row["mean"] = float(np.mean(vals))
        table.append(row)
    return markdown_table(table, ["detector", *attacks, *(["mean"] if len(attacks) > 1 else [])])


def write_outputs(result: dict[str, Any], out: str | Path, command: str | None = None) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` and ``roc_<protocol>.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = result.get("scores", {})
    files: dict[str, Path] = {}
    for protocol, per_attack in scores.items():
        if not per_attack:
            continue
        # nad-guard per attack, and every detector on one attack (pgd when present)
        curves = {a: (s["nad-guard"]["clean"], s["nad-guard"]["adv"]) for a, s in per_attack.items() if "nad-guard" in s}
        focus = "pgd" if "pgd" in per_attack else next(iter(per_attack))
        if len(curves) > 1:
            files[f"roc_{protocol}"] = plot_roc(curves, out / f"roc_{protocol}.png",
                                                title=f"nad-guard, {protocol} protocol")
        files[f"roc_{protocol}_{focus}"] = plot_roc(
            {k: (v["clean"], v["adv"]) for k, v in per_attack[focus].items()},
            out / f"roc_{protocol}_{focus}.png", title=f"{protocol}: {focus}")
    js = {k: v for k, v in result.items() if k != "scores"}
    if command:
        js["command"] = command
    files["json"] = write_json(out / "results.json", js)
    files["md"] = out / "results.md"
    files["md"].write_text(render_markdown(js))
    return files


def _who(cfg: dict[str, Any]) -> str:
    m, e = cfg["primary"]
    if cfg.get("select", "fixed") == "cv":
        return (f"per training task, the best of {', '.join(cfg['methods'])} x {', '.join(cfg['encodings'])} encodings by "
                f"{cfg['cv_folds']}-fold cross-validation on the fit part")
    return f"{m} on the '{e}' encoding"


def _clean_who(cfg: dict[str, Any]) -> str:
    method, enc = clean_spec(cfg["clean_methods"][0], cfg["primary"][1])
    return f"{method} on the '{enc}' encoding"


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]["start"]
    lines = [f"# Detection evaluation: {r['model']} on {r['data']['test']} (suite {r['config']['suite']})", ""]
    if r.get("command"):
        lines += ["Command:", "", "```", r["command"], "```", ""]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; load average at "
              f"start {m['load_average']}, at end {r['machine']['end']['load_average']} (other jobs share the "
              f"cores). Run time {r['seconds']:.0f} s (timings: {r['timings']}).", ""]
    dd = r["data"]
    lines += [f"Splits of the {dd['test_images']} test images: detector-fit {dd['fit_images']} "
              f"({dd['fit_clean']} correct), calibration {dd['calibration_images']} ({dd['calibration_clean']} correct, "
              f"thresholds at {r['config']['fpr']:.0%} FPR), evaluation {dd['evaluation_images']} "
              f"({dd['evaluation_clean']} correct, {dd['evaluation_mispredicted']} mispredicted). Baselines' "
              f"unsupervised parts: {dd['baseline_train_images']} training images. nad-guard = {_who(r['config'])} "
              f"(clean-only: {_clean_who(r['config'])}). "
              f"Bootstrap: {r['config']['n_resamples']} stratified resamples, "
              "95% percentile intervals.", ""]
    cal = r.get("calibration")
    if cal:
        g = calibration_guarantee(cal["n"], cal["fpr"])
        lines += [f"Every threshold (the TPR columns, `test_fpr`) is set by the rule the deployed guard uses "
                  f"(`nad_guard.calibration`): {g.summary()}." + (f" **{g.warning}.**" if g.warning else ""), ""]
    prov = r.get("provenance")
    if prov:
        lines += [f"Holdout parts (seed {prov['seed']}, recorded by content hash): split {prov['split_name']} sha256 "
                  f"{prov['split_sha256'][:12]}, "
                  + ", ".join(f"{k} {v['images']} images sha256 {v['sha256'][:12]}" for k, v in prov["parts"].items())
                  + "." + (f" Against the artifact's guard: {prov['guard']['note']}." if "guard" in prov else ""), ""]
    lines += ["## Attacks (successful ones only are kept)", ""]
    rows = []
    for split, res in r["attacks"].items():
        for a, s in res.items():
            rows.append({"split": split, "attack": a, "attacked": s["n_correct"], "success rate": s["success_rate"],
                         "kept": s["n_kept"], "mean L-inf": s["mean_linf"], "mean L2": s["mean_l2"],
                         "seconds": s["seconds"]})
    lines += [markdown_table(rows), ""]
    lines += ["## Summary: mean AUROC per protocol", ""]
    srows = []
    for p, s in r["summary"].items():
        nad = s["detectors"].get("nad-guard", {})
        srows.append({"protocol": p, "nad-guard mean AUROC": s["nad_guard_mean_auroc"],
                      "nad-guard min AUROC": nad.get("min_auroc"), "nad-guard mean TPR@5%": nad.get("mean_tpr"),
                      "best baseline": s["best_baseline"], "its mean AUROC": s["best_baseline_mean_auroc"],
                      "its mean TPR@5%": s["detectors"].get(s["best_baseline"], {}).get("mean_tpr")})
    lines += [markdown_table(srows), ""]
    chosen = [{"protocol": x["protocol"], "attack": x["attack"], "trained on": x["trained_on"],
               "folds by": x["cv"]["folds_by"], "selected": x["selected"],
               **{f"CV {k}": v for k, v in x["cv"]["auroc"].items()}}
              for x in r["rows"] if x["detector"] == "nad-guard" and x.get("cv")]
    if chosen:
        lines += ["## nad-guard's detector per training task", "",
                  f"Chosen by {r['config']['cv_folds']}-fold cross-validated AUROC on the task's training data (the "
                  "fit part), before anything is scored on the evaluation part. Folds are stratified and grouped: "
                  "by attack when the task trains on at least as many attacks (or kinds of error) as there are "
                  "folds (each fold holds out whole attacks), else by source image (an image and its "
                  "adversarials stay on one side).", "", markdown_table(chosen), ""]
    for p in r["summary"]:
        lines += [f"## {p}: AUROC", "", _pivot(r["rows"], p, "auroc"), f"## {p}: TPR at 5% FPR "
                  "(threshold from the calibration part)", "", _pivot(r["rows"], p, "tpr")]
    if r.get("adaptive"):
        a = r["adaptive"]
        lines += ["## Adaptive white-box attack", "",
                  f"L-inf PGD, eps {a['eps']:.4g}, step {a['alpha']:.4g}, {a['steps']} steps, random start, on "
                  f"{a['images']} correctly classified evaluation images; loss = clamp(classifier margin, "
                  f"-{a['kappa']}) + lambda x detector surrogate, lambdas {a['lambdas']}. 'Evades' = some iterate "
                  "is misclassified and not flagged at the calibrated threshold (the share of attacked images; "
                  "lower is better for the defender).", ""]
        arows = [{"detector": k, "plain PGD evades": v["plain_pgd_evades"], "adaptive evades": v["adaptive_evades"],
                  **{f"lambda {lam}": v["per_lambda"][lam] for lam in v["per_lambda"] if lam != "0.0"},
                  "surrogate": v["surrogate"], "seconds": v["seconds"]} for k, v in a["detectors"].items()]
        lines += [markdown_table(arows), ""]
    lines += ["## All rows (with 95% bootstrap intervals)", ""]
    cols = ["protocol", "detector", "attack", "trained_on", "auroc", "auroc_ci", "aupr", "aupr_ci", "tpr", "tpr_ci",
            "test_fpr", "n_clean", "n_suspicious"]
    lines += [markdown_table(r["rows"], cols)]
    return "\n".join(lines)
