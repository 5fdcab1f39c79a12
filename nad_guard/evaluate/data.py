"""The material of one evaluation run, computed once and shared by the protocols: :class:`EvalData`
(holdout parts, their clean and mispredicted images, the attacks on them, and every image set's
features, keyed by :class:`~nad_guard.evaluate.features.FeatureKey`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nad_guard.attacks import AttackResult, generate, get_suite
from nad_guard.baselines import default_layers
from nad_guard.data import ImageSet, stratified_split
from nad_guard.evaluate.config import EvalConfig
from nad_guard.evaluate.features import (CLEAN, FIT_CLEAN, FIT_WRONG, PARTS, WRONG, FeatureKey, FeatureSet,
                                         compute_features, concat_feature_sets)
from nad_guard.evaluate.multipass import image_columns
from nad_guard.holdout import correct_subset, holdout_provenance
from nad_guard.paths import PathModel


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
        self.noisy = cfg.noisy_controls(suite, self.attacks)  # noise controls counted as negatives
        self.layers = default_layers(clf)
        enc = sorted(set(cfg.encodings) | {cfg.primary[1]} | {e for _, e in cfg.clean_specs()})
        self.encodings = enc

        t0 = time.time()
        # the classifier's training images for the unsupervised parts of the baselines (first: what the
        # multi-pass columns fit, e.g. Mahalanobis's class means, comes from them)
        if len(train) > cfg.train_images:
            _, keep = stratified_split(train.labels.numpy(), cfg.train_images, seed=cfg.seed)
            train = train.subset(keep, f"{train.name}[{cfg.train_images}]")
        self.train_base = compute_features(paths, train, train.labels, enc[:1], self.layers, cfg.batch_size,
                                           cfg.progress, "train").base
        self.train_labels = train.labels.numpy()
        self.column_seconds: dict[str, float] = {}
        self.image_columns = {n: self._timed(n, fn) for n, fn in image_columns(self).items()}

        def feats(images: torch.Tensor, labels: Any, desc: str) -> FeatureSet:
            return compute_features(paths, images, labels, enc, self.layers, cfg.batch_size, cfg.progress, desc,
                                    self.image_columns)

        self.features: dict[FeatureKey, FeatureSet] = {}
        feature_seconds = time.time() - t0
        t0 = time.time()
        for split in ("fit", "calibration", "evaluation"):
            c = self.clean[split]
            self.features[FeatureKey(split, CLEAN)] = feats(c, c.labels, f"{split} clean")
        # rows that come from one source image share a group (for cross-validation on the fit part)
        self.groups: dict[FeatureKey, np.ndarray] = {FIT_CLEAN: np.arange(len(self.clean["fit"]))}
        self.n_wrong: dict[str, int] = {}
        for split, images in (("evaluation", ev), ("fit", fit)):
            wrong = self._wrong(images)
            self.n_wrong[split] = len(wrong)
            if len(wrong):
                w = images.subset(wrong)
                self.features[FeatureKey(split, WRONG)] = feats(w, w.labels, f"{split} mispredicted")
                if split == "fit":
                    self.groups[FIT_WRONG] = len(self.clean["fit"]) + np.arange(len(wrong))
        feature_seconds += time.time() - t0
        # one attack at a time: generate (or read from the cache), take its features, drop its images,
        # so the images held never exceed one attack's on one split
        self.attack_seconds = 0.0
        self.adv: dict[str, dict[str, AttackResult]] = {"fit": {}, "evaluation": {}}
        # the noise controls counted as negatives: on every part (the calibration part's join the thresholds')
        self.adv |= {"calibration": {}} if self.noisy else {}
        bar = tqdm([(s, a) for s in ("fit", "evaluation") for a in self.attacks]
                   + [(s, n) for s in PARTS for n in self.noisy], desc="attacks", disable=not cfg.progress)
        for split, attack in bar:
            bar.set_postfix_str(f"{split}:{attack}")
            t0 = time.time()
            r = generate(clf, self.clean[split], attack=attack, suite=suite, batch_size=cfg.batch_size, device=dev,
                         cache_dir=cache_dir, progress=cfg.progress)
            t1 = time.time()
            self.attack_seconds += t1 - t0
            if len(r):
                self.features[FeatureKey.attack(split, attack)] = feats(r.adv_images, r.labels, f"{split} {attack}")
                if split == "fit":
                    self.groups[FeatureKey.attack("fit", attack)] = r.indices.numpy()
            self.adv[split][attack] = replace(r, adv_images=r.adv_images[:0])
            feature_seconds += time.time() - t1
        # each part's negatives: its clean images, then the noisy copies (grouped with their source image)
        self.negatives = {part: FeatureKey.negatives(part, self.noisy) for part in PARTS}
        if self.noisy:
            for part, key in self.negatives.items():
                noisy = [FeatureKey.attack(part, n) for n in self.noisy]
                self.features[key] = concat_feature_sets([self.features[FeatureKey(part, CLEAN)]]
                                                         + [self.features[k] for k in noisy])
            self.groups[self.negatives["fit"]] = np.concatenate(
                [self.groups[FIT_CLEAN]] + [self.groups[FeatureKey.attack("fit", n)] for n in self.noisy])
        log(f"attacks ready in {self.attack_seconds:.0f} s")
        self.feature_seconds = feature_seconds
        log(f"features ready in {self.feature_seconds:.0f} s")
        self.usable = [a for a in self.attacks
                       if all(FeatureKey.attack(part, a) in self.features for part in ("fit", "evaluation"))]
        self._choices: dict[tuple[FeatureKey, ...], tuple[tuple[str, str], dict[str, float]]] = {}

    def _timed(self, name: str, fn: Callable[[torch.Tensor], np.ndarray]) -> Callable[[torch.Tensor], np.ndarray]:
        """``fn``, adding the seconds it takes to ``column_seconds[name]``."""
        self.column_seconds[name] = 0.0

        def run(x: torch.Tensor) -> np.ndarray:
            t0 = time.time()
            out = fn(x)
            self.column_seconds[name] += time.time() - t0
            return out

        return run

    def training_set(self, train_keys: Sequence[FeatureKey]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Labels (0 for the first key, the negatives: ``FIT_CLEAN`` or :attr:`negatives` ``["fit"]``, 1 for
        the rest) of ``train_keys``'s rows, and each suspicious block's source-image indices."""
        y = np.concatenate([np.zeros(len(self.features[train_keys[0]]))]
                           + [np.ones(len(self.features[k])) for k in train_keys[1:]])
        return y, [self.groups[k] for k in train_keys[1:]]

    def folds(self, train_keys: Sequence[FeatureKey]) -> tuple[np.ndarray, np.ndarray, str]:
        """Labels, cross-validation groups and how they group (:func:`nad_guard.detectors.cv_groups`) of
        ``train_keys``'s rows (negatives first; noisy negatives share their source image's group)."""
        from nad_guard.detectors import cv_groups

        y, blocks = self.training_set(train_keys)
        return (y, *cv_groups(self.groups[train_keys[0]], blocks, self.cfg.cv_folds))

    def choose(self, train_keys: Sequence[FeatureKey]) -> tuple[tuple[str, str], dict[str, Any]]:
        """The ``(method, encoding)`` standing for nad-guard when trained on ``train_keys`` (the first being
        the negatives), and the cross-validated AUROC of every candidate with how the folds were grouped
        (empty when ``select="fixed"``)."""
        cfg = self.cfg
        if cfg.select == "fixed":
            return tuple(cfg.primary), {}
        key = tuple(train_keys)
        if key not in self._choices:
            from nad_guard.detectors import select_by_cv

            y, groups, by = self.folds(train_keys)
            cands = {f"{m},{e}": (m, np.vstack([self.features[k].path[e] for k in train_keys]))
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
