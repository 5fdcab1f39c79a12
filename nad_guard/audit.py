"""Offline audit of a guard on a labelled data set: a report a person reads.

:func:`run_audit` streams a data split through :meth:`Guard.run <nad_guard.guard.Guard.run>` in
batches and keeps, per input, only scalars (label, prediction, confidence, trust, suspicion score,
flag, nearest sub-architecture, ranks) and the per-layer divergence ``(L,)``, plus the images of
the ``gallery_size`` least trusted inputs: memory is ``O(N * L)`` numbers, time linear in ``N``.
:func:`write_report` turns the :class:`AuditResult` into a self-contained folder: ``index.html``
(no external assets, no JavaScript), ``summary.json``, ``samples.csv`` and PNG figures.

Definitions (one each, shared with the service):

``nearest_path_class``
    :attr:`PathFeatures.nearest_path_class <nad_guard.paths.PathFeatures.nearest_path_class>`: the
    argmax over classes of :attr:`~nad_guard.paths.PathFeatures.path_similarity` (the mean over gate
    points of the per-layer class score ``s_k`` of :mod:`nad_guard.paths`: how well class ``k``'s
    sub-architecture matches the input's path).
``true_class_path_rank``
    :meth:`PathFeatures.true_class_rank <nad_guard.paths.PathFeatures.true_class_rank>`: rank
    ``1..K`` of the true class's sub-architecture by path similarity (1 = nearest; ties count in
    the true class's favour).
``classifier_true_rank``
    ``1 + #{k : logit_k > logit_true}``: where the classifier itself ranks the true class (1 =
    predicted; ties in the true class's favour).
divergence at a gate point
    ``1 - mass_share``: the share of the layer's pooled activation outside the predicted class's
    sub-architecture (0 = entirely inside), as the service reports it.
``suspicion_score`` / ``trust_score`` / ``flagged``
    :class:`~nad_guard.guard.GuardResult`'s ``score`` (higher = more suspicious), ``trust``
    (conformal p-value in (0, 1], higher = more trustworthy) and ``flag`` (score above the
    threshold calibrated at the guard's false-positive rate).

Honest separation figures: a guard's detector is fitted on the *detector-fit* part (40%) of its data
set's test split and its threshold on the *calibration* part (20%, see
:func:`training.detector.holdout_splits`). When the audited split is that split, every image is
assigned its part from the provenance the guard's meta.json records (positions in the split, checked
by content hash: :mod:`nad_guard.provenance`; no recomputed score is used to tell images apart), and
ROC, AUROC and the caught share are measured on the *evaluation* part only (the images the detector
never saw). When the guard records no provenance, or the audited split's content is not the recorded
one, the report says so (and how to fix it) and measures on all images. The report also gives what
the clean calibration set guarantees about the false-positive rate (:mod:`nad_guard.calibration`).
Attacks (optional) are made only on correctly classified images of the evaluation part (all images
when the audited data is not the detector's), through :func:`nad_guard.attacks.generate`
and its on-disk cache; only successful ones are kept.
"""

from __future__ import annotations

import csv
import heapq
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from nad_guard.data import DATASETS, ImageSet, stratified_split
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard, GuardResult
from nad_guard.provenance import PART_INDEPENDENT, PART_UNKNOWN, locate
from nad_guard.runinfo import portable_path

GALLERY_SIZE = 24
ATTACK_CHUNK = 2048   # images per attack call: bounds the adversarial images held at once
BOOTSTRAP_CELLS = 2_000_000  # bootstrap weights held at once (bounds the AUROC interval's memory)
MAX_TABLE_ROWS = 500  # misprediction rows shown in index.html (all are in samples.csv)
CLEAN = "clean"
SCALARS = ("label", "pred", "confidence", "trust", "score", "flag", "nearest_path", "true_path_rank",
           "clf_true_rank")


class AuditError(ValueError):
    """The audit's input does not fit: no images, or data the guard's classifier cannot take."""


# --------------------------------------------------------------------------- per-sample records

@dataclass
class Samples:
    """Per-input results of one group (the clean data, or one attack's adversarial examples).

    ``position`` ``(N,)`` int64: the input's (for adversarial inputs: its source image's) position in
    the audited split; ``part`` ``(N,)`` str: which part of the detector's holdout split that image
    belongs to; ``label`` true class, ``pred`` predicted class ``(N,)`` int64; ``confidence``
    (softmax probability of ``pred``), ``trust``, ``score`` ``(N,)`` float64; ``flag`` ``(N,)`` bool;
    ``nearest_path``, ``true_path_rank``, ``clf_true_rank`` ``(N,)`` int64; ``divergence`` ``(N, L)``
    float64 in [0, 1]; ``layer_nearest`` ``(N, L)`` int64: the nearest class at each gate point.
    """

    position: np.ndarray
    part: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    trust: np.ndarray
    score: np.ndarray
    flag: np.ndarray
    nearest_path: np.ndarray
    true_path_rank: np.ndarray
    clf_true_rank: np.ndarray
    divergence: np.ndarray
    layer_nearest: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    def select(self, mask: np.ndarray) -> "Samples":
        return Samples(**{k: v[mask] for k, v in vars(self).items()})


class _Collector:
    """Appends per-batch arrays; :meth:`samples` concatenates them once."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.chunks: list[dict[str, np.ndarray]] = []

    def add(self, rec: dict[str, np.ndarray]) -> None:
        self.chunks.append(rec)

    def samples(self) -> Samples:
        if not self.chunks:
            empty = {k: np.zeros(0, dtype=np.int64) for k in SCALARS}
            empty.update(confidence=np.zeros(0), trust=np.zeros(0), score=np.zeros(0),
                         flag=np.zeros(0, dtype=bool), position=np.zeros(0, dtype=np.int64),
                         part=np.zeros(0, dtype=object), divergence=np.zeros((0, self.n_layers)),
                         layer_nearest=np.zeros((0, self.n_layers), dtype=np.int64))
            return Samples(**empty)
        return Samples(**{k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]})


def _scalars(r: GuardResult, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-sample record of ``r``'s rows, whose true labels are ``labels`` (see :class:`Samples`)."""
    f = r.features
    logits = f.logits.double()
    y = labels.view(-1, 1).to(f.pred.device)
    return {
        "label": labels.numpy().astype(np.int64), "pred": f.pred.numpy().astype(np.int64),
        "confidence": logits.softmax(1).gather(1, f.pred.view(-1, 1)).squeeze(1).numpy(),
        "trust": np.asarray(r.trust, dtype=np.float64), "score": np.asarray(r.score, dtype=np.float64),
        "flag": np.asarray(r.flag, dtype=bool),
        "nearest_path": f.nearest_path_class.numpy().astype(np.int64),
        "true_path_rank": f.true_class_rank(labels).numpy().astype(np.int64),
        "clf_true_rank": (1 + (logits > logits.gather(1, y)).sum(1)).numpy().astype(np.int64),
        "divergence": (1 - f.mass_share.double()).numpy(),
        "layer_nearest": f.nearest_class.numpy().astype(np.int64),
    }


# --------------------------------------------------------------------------- gallery

@dataclass
class GalleryItem:
    """One of the least trusted inputs: its image ``(C, H, W)`` uint8 and its record."""

    position: int
    image: np.ndarray
    label: int
    pred: int
    confidence: float
    trust: float
    score: float
    flag: bool
    nearest_path: int
    true_path_rank: int
    part: str


class _LeastTrusted:
    """The ``size`` least trusted inputs seen so far (lowest trust, then highest score, then lowest
    position), in a bounded heap: memory does not grow with the number of inputs."""

    def __init__(self, size: int):
        self.size = size
        self.heap: list[tuple[tuple[float, float, int], GalleryItem]] = []

    def offer(self, rec: dict[str, np.ndarray], images: torch.Tensor, positions: np.ndarray,
              parts: np.ndarray) -> None:
        if self.size <= 0:
            return
        order = np.lexsort((positions, -rec["score"], rec["trust"]))[:self.size]
        for i in order:
            # heap root = the most trusted kept item, the one to evict
            key = (-float(rec["trust"][i]), float(rec["score"][i]), -int(positions[i]))
            if len(self.heap) == self.size and key <= self.heap[0][0]:
                continue
            item = GalleryItem(int(positions[i]), images[i].numpy().copy(), int(rec["label"][i]),
                               int(rec["pred"][i]), float(rec["confidence"][i]), float(rec["trust"][i]),
                               float(rec["score"][i]), bool(rec["flag"][i]), int(rec["nearest_path"][i]),
                               int(rec["true_path_rank"][i]), str(parts[i]))
            if len(self.heap) < self.size:
                heapq.heappush(self.heap, (key, item))
            else:
                heapq.heapreplace(self.heap, (key, item))

    def items(self) -> list[GalleryItem]:
        """Least trusted first."""
        return [item for _, item in sorted(self.heap, key=lambda t: t[0], reverse=True)]


# --------------------------------------------------------------------------- data

def load_split(name: str, split: str = "test", root: str | Path | None = None, guard: Guard | None = None
               ) -> ImageSet:
    """One split (``"test"`` or ``"train"``) of a named data set (see :mod:`nad_guard.data`); an
    ``imagefolder`` is converted to the guard's channels and size."""
    from nad_guard.data import load_cifar10, load_dataset

    if name not in DATASETS:
        raise AuditError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("test", "train"):
        raise AuditError(f"split must be 'test' or 'train', got {split!r}")
    if name == "cifar10":
        return load_cifar10(root, split)
    kw: dict[str, Any] = {}
    if name == "imagefolder" and guard is not None:
        spec = guard.classifier.spec
        kw = {"channels": spec.channels, "size": (spec.height, spec.width)}
    train, test = load_dataset(name, root, **kw)
    return test if split == "test" else train


def check_fits(guard: Guard, data: ImageSet) -> None:
    """Raise :class:`AuditError` naming what is wrong if ``data`` cannot be audited with ``guard``."""
    spec, clf = guard.classifier.spec, guard.classifier
    what = f"data set {data.name or 'given'}"
    if len(data) == 0:
        raise AuditError(f"{what} holds no images; expected labelled images of {spec.channels}x{spec.height}x"
                         f"{spec.width} for classes {clf.class_names[:10]}")
    if tuple(data.shape) != tuple(spec.shape):
        c, h, w = data.shape
        raise AuditError(f"{what} has {c}x{h}x{w} images (C x H x W); the guard's classifier {clf.name!r} takes "
                         f"{spec.channels}x{spec.height}x{spec.width}: audit it with data of that size")
    if data.num_classes != clf.num_classes or list(data.classes) != list(clf.class_names):
        raise AuditError(f"{what} has {data.num_classes} classes {list(data.classes)[:10]}; the guard's "
                         f"classifier {clf.name!r} has {clf.num_classes} classes {clf.class_names[:10]}: labels "
                         "must name the same classes in the same order")
    bad = (data.labels < 0) | (data.labels >= clf.num_classes)
    if bool(bad.any()):
        raise AuditError(f"{what} has labels outside 0..{clf.num_classes - 1}")


# --------------------------------------------------------------------------- detector holdout parts

def _unseen(parts: np.ndarray) -> np.ndarray:
    """Images the detector was neither fitted nor calibrated on: its evaluation part, and (when it was
    fitted on a sample of the audited split) the images outside that sample."""
    return np.isin(parts, ("evaluation", PART_INDEPENDENT))


def holdout_parts(guard: Guard, data: ImageSet) -> tuple[np.ndarray, dict[str, Any]]:
    """Which part of the guard detector's holdout split each image of ``data`` (a whole split) is in,
    read from the provenance recorded in the guard's meta.json and checked by content hash
    (:func:`nad_guard.provenance.locate`: status ``verified``, ``independent``, ``mismatch`` or
    ``unrecorded``). Returns ``(parts, info)``; ``parts`` ``(len(data),)`` holds :data:`nad_guard.provenance.PARTS`,
    :data:`PART_INDEPENDENT` (never used by the detector) or :data:`PART_UNKNOWN`."""
    det = guard.meta.get("detector") or {}
    parts, info = locate(det.get("provenance"), data)
    info.update(detector_fit_set=det.get("fit_set"), detector_calibration_set=det.get("calibration_set"),
                detector_fit_mispredicted=det.get("fit_mispredicted"))
    return parts, info


# --------------------------------------------------------------------------- the audit

@dataclass
class AuditResult:
    """Everything :func:`write_report` needs; ``summary`` holds every number of the report."""

    clean: Samples
    adversarial: dict[str, Samples]
    gallery: list[GalleryItem]
    class_names: list[str]
    layers: list[str]
    similarity: np.ndarray
    threshold: float
    split: dict[str, Any]
    config: dict[str, Any]
    attack_stats: dict[str, Any]
    timings: dict[str, float]
    calibration: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit="batch", leave=False)


def _pass(guard: Guard, data: ImageSet, positions: np.ndarray, parts: np.ndarray, batch_size: int,
          progress: bool, desc: str, gallery: _LeastTrusted | None = None) -> Samples:
    """Stream ``data.images[positions]`` through the guard in batches; keep only per-sample scalars."""
    col = _Collector(len(guard.paths.layer_names_))
    starts = range(0, len(positions), batch_size)
    for s in _progress(starts, len(starts), desc, progress):
        pos = positions[s:s + batch_size]
        idx = torch.as_tensor(pos, dtype=torch.long)
        images = data.images[idx]
        x = images.float().div_(255.0)
        rec = _scalars(guard.run(x, batch_size=len(x)), data.labels[idx])
        rec["position"], rec["part"] = pos.astype(np.int64), parts[pos]
        col.add(rec)
        if gallery is not None:
            gallery.offer(rec, images, pos, parts[pos])
    return col.samples()


def _attack_pass(guard: Guard, data: ImageSet, positions: np.ndarray, parts: np.ndarray, suite: Any,
                 names: Sequence[str], *, batch_size: int, attack_batch_size: int, device: torch.device,
                 cache_dir: str | Path | None, progress: bool) -> tuple[dict[str, Samples], dict[str, Any]]:
    """Adversarial examples of ``data.images[positions]`` (correctly classified ones only; successful ones
    kept), in chunks of :data:`ATTACK_CHUNK` images, each scored by the guard and reduced to scalars."""
    from nad_guard.attacks import generate

    out: dict[str, Samples] = {}
    stats: dict[str, Any] = {}
    n_layers = len(guard.paths.layer_names_)
    for name in names:
        col = _Collector(n_layers)
        agg = {"attacked": 0, "kept": 0, "success": 0, "generate_s": 0.0, "from_cache": True, "linf": 0.0, "l2": 0.0}
        t0 = time.perf_counter()
        for c in range(0, len(positions), ATTACK_CHUNK):
            pos = positions[c:c + ATTACK_CHUNK]
            chunk = data.subset(pos, f"{data.name}[audit {c}:{c + len(pos)}]")
            res = generate(guard.classifier, chunk, attack=name, suite=suite, batch_size=attack_batch_size,
                           device=device, cache_dir=cache_dir, progress=progress)
            agg["attacked"] += res.stats.n_correct
            agg["kept"] += res.stats.n_kept
            agg["success"] += res.stats.n_success
            agg["generate_s"] += res.stats.seconds
            agg["from_cache"] &= res.from_cache
            agg["linf"] += float(res.linf.double().sum())
            agg["l2"] += float(res.l2.double().sum())
            src = pos[res.indices.numpy()]
            for s in range(0, len(res), batch_size):
                x = res.adv_images[s:s + batch_size]
                rec = _scalars(guard.run(x, batch_size=len(x)), res.labels[s:s + batch_size])
                rec["position"], rec["part"] = src[s:s + batch_size], parts[src[s:s + batch_size]]
                col.add(rec)
            guard.classifier.to(device)
        out[name] = col.samples()
        kept = max(agg["kept"], 1)
        stats[name] = {"attacked": agg["attacked"], "kept": agg["kept"],
                       "success_rate": agg["success"] / max(agg["attacked"], 1),
                       "mean_linf": agg["linf"] / kept if agg["kept"] else None,
                       "mean_l2": agg["l2"] / kept if agg["kept"] else None,
                       "generation_seconds": round(agg["generate_s"], 2), "from_cache": bool(agg["from_cache"]),
                       "seconds": round(time.perf_counter() - t0, 2)}
    return out, stats


def run_audit(guard: Guard, data: ImageSet, *, max_images: int | None = None, attacks: Sequence[str] | None = None,
              suite: str | Any | None = None, attack_images: int | None = None, batch_size: int = 256,
              attack_batch_size: int = 128, gallery_size: int = GALLERY_SIZE, device: str | torch.device = "cpu",
              cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
              source: str | None = None, log: Callable[[str], None] | None = None) -> AuditResult:
    """Audit ``guard`` on ``data`` (a whole split; ``max_images`` takes a seeded stratified sample of it).

    Args:
        attacks: attack names of ``suite`` to run on the correctly classified images of the detector's
            evaluation part (see the module docstring); ``None``: no attacks.
        suite: an attack suite name (:func:`nad_guard.attacks.get_suite`) or an ``AttackSuite``;
            with ``attacks=None`` and a suite, every attack of the suite but the noise controls is run.
        attack_images: at most this many images are attacked (seeded stratified sample).
        batch_size: images per guard forward pass; bounds memory. Results do not depend on it.
        attack_batch_size: images per attack call (part of the attack cache key).
        cache_dir: the attack cache (``None``: no caching).
        source: where the guard came from (a directory), for the report.

    Returns:
        :class:`AuditResult` with every per-sample record and the report's numbers in ``summary``.
    """
    from nad_guard.models import resolve_device

    log = log or (lambda _msg: None)
    t_start = time.perf_counter()
    if batch_size < 1 or attack_batch_size < 1:
        raise AuditError(f"batch sizes must be positive, got {batch_size} and {attack_batch_size}")
    if gallery_size < 0:
        raise AuditError(f"gallery_size must be >= 0, got {gallery_size}")
    check_fits(guard, data)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    guard.to(dev)
    n_split = len(data)
    positions = np.arange(n_split)
    if max_images is not None:
        if max_images < data.num_classes:
            raise AuditError(f"--max-images {max_images} is too few for a stratified sample of {data.num_classes} "
                             f"classes: give at least {data.num_classes}")
        if max_images < n_split:
            positions = _stratified(data.labels.numpy(), max_images, seed)
    parts, split = holdout_parts(guard, data)
    gallery = _LeastTrusted(gallery_size)
    t0 = time.perf_counter()
    clean = _pass(guard, data, positions, parts, batch_size, progress, "audit", gallery)
    t_clean = time.perf_counter() - t0
    log(f"audited {len(clean)} images in {t_clean:.1f} s; detector split: {split['status']}")

    adversarial: dict[str, Samples] = {}
    attack_stats: dict[str, Any] = {}
    suite_obj = None
    t_attack = 0.0
    if attacks is not None or suite is not None:
        from nad_guard.attacks import get_suite

        if suite is None:
            raise AuditError("attacks need a suite (e.g. 'mnist' or 'cifar10')")
        suite_obj = get_suite(suite, seed=seed) if isinstance(suite, str) else suite
        names = list(attacks) if attacks else [a for a in suite_obj.names if not a.startswith("noise")]
        for a in names:
            suite_obj[a]  # raises ValueError naming the suite's attacks
        src = positions[_unseen(clean.part)] if split["status"] == "verified" else positions
        if attack_images is not None and attack_images < len(src):
            if attack_images < 1:
                raise AuditError(f"attack_images must be positive, got {attack_images}")
            keep = _stratified(data.labels.numpy()[src], attack_images, seed) if attack_images >= data.num_classes \
                else np.sort(np.random.default_rng(seed).choice(len(src), attack_images, replace=False))
            src = src[keep]
        t0 = time.perf_counter()
        adversarial, attack_stats = _attack_pass(guard, data, src, parts, suite_obj, names, batch_size=batch_size,
                                                 attack_batch_size=attack_batch_size, device=dev,
                                                 cache_dir=cache_dir, progress=progress)
        t_attack = time.perf_counter() - t0
        log(f"attacks {', '.join(names)} on {len(src)} images in {t_attack:.1f} s")

    det = guard.meta.get("detector") or {}
    config = {
        "guard": source, "model": guard.classifier.name,
        "detector_method": det.get("method"), "encoding": guard.encoding, "fpr": det.get("fpr"),
        "data": data.name, "split_images": n_split, "max_images": max_images, "audited_images": len(clean),
        "attack_suite": getattr(suite_obj, "name", None), "attacks": list(adversarial) or None,
        "attack_images": attack_images, "batch_size": batch_size, "attack_batch_size": attack_batch_size,
        "gallery_size": gallery_size, "device": str(dev), "seed": seed,
        "cache_dir": portable_path(cache_dir) if cache_dir is not None else None,
    }
    result = AuditResult(
        clean=clean, adversarial=adversarial, gallery=gallery.items(), class_names=list(guard.classifier.class_names),
        layers=list(guard.paths.layer_names_), similarity=guard.paths.similarity().numpy(),
        threshold=float(guard.detector.threshold_), split=split, config=config, attack_stats=attack_stats,
        timings={"clean_pass_s": round(t_clean, 3), "attacks_s": round(t_attack, 3)},
        calibration=calibration_record(guard))
    t0 = time.perf_counter()
    result.summary = summarize(result)
    result.timings["metrics_s"] = round(time.perf_counter() - t0, 3)
    result.timings["audit_s"] = round(time.perf_counter() - t_start, 3)
    result.timings["images_per_s"] = round(len(clean) / max(t_clean, 1e-9), 1)
    return result


def calibration_record(guard: Guard) -> dict[str, Any]:
    """What the guard's clean calibration set guarantees about its false-positive rate
    (:meth:`PathDetector.calibration <nad_guard.detectors.PathDetector.calibration>`), with a one-line
    ``summary``; ``warning`` is set when the set is too small for a tight bound."""
    g = guard.detector.calibration()
    return {**g.to_dict(), "summary": g.summary()}


def _stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded stratified sample of ``n`` of ``labels``."""
    if n >= len(labels):
        return np.arange(len(labels))
    try:
        _, keep = stratified_split(labels, n, seed)
    except ValueError:  # a class too small to stratify: plain seeded sample
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), n, replace=False))
    return keep


# --------------------------------------------------------------------------- the report's numbers

def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``k / n`` (95% by default); ``None`` for ``n == 0``."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _share(mask: np.ndarray) -> dict[str, Any]:
    n, k = int(mask.size), int(mask.sum())
    return {"k": k, "n": n, "share": k / n if n else None, "ci": wilson(k, n)}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class."""
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def _claim_group(s: Samples, k: int) -> dict[str, Any]:
    return {
        "n": len(s),
        "path_top1": _share(s.true_path_rank == 1), "path_top3": _share(s.true_path_rank <= 3),
        "classifier_second": _share(s.clf_true_rank == 2), "classifier_top3": _share(s.clf_true_rank <= 3),
        "path_is_pred": _share(s.nearest_path == s.pred),
    }


CLAIM_MEASURES = (
    ("path_top1", "path nearest to the true class's sub-architecture (rank 1)", "1/K"),
    ("path_top3", "true class's sub-architecture among the 3 nearest", "3/K"),
    ("classifier_second", "true class is the classifier's 2nd choice", "1/(K-1)"),
    ("classifier_top3", "true class in the classifier's top 3", "2/(K-1)"),
    ("path_is_pred", "path nearest to the predicted class's sub-architecture", "1/K"),
)


def _chance(rule: str, k: int) -> float:
    return {"1/K": 1 / k, "3/K": min(3, k) / k, "1/(K-1)": 1 / max(k - 1, 1),
            "2/(K-1)": min(2, k - 1) / max(k - 1, 1)}[rule]


def _spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    import warnings

    from scipy.stats import spearmanr

    out: dict[str, Any] = {"n_pairs": int(len(x)), "n_pairs_confused": int((y > 0).sum()), "rho": None,
                           "p_value": None}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "undefined: too few pairs, or one of the two is constant"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(x, y)
    out["rho"], out["p_value"] = float(r.statistic), float(r.pvalue)
    return out


def _pair_rates(conf: np.ndarray) -> np.ndarray:
    """Row-normalised off-diagonal rates, symmetrised: ``(R[i, j] + R[j, i]) / 2`` ``(K, K)``."""
    rows = conf.sum(1, keepdims=True)
    rate = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=np.float64), where=rows > 0)
    np.fill_diagonal(rate, 0.0)
    return (rate + rate.T) / 2


def _separation_row(what: str, neg: np.ndarray, pos: np.ndarray, neg_flag: np.ndarray | None,
                    pos_flag: np.ndarray | None, seed: int) -> dict[str, Any]:
    from nad_guard.metrics import auroc, bootstrap_ci, labels_and_scores

    row: dict[str, Any] = {"what": what, "n_correct": int(len(neg)), "n_positive": int(len(pos)),
                           "auroc": None, "auroc_ci": None, "caught": None, "caught_ci": None,
                           "false_alarms": None}
    if len(neg) and len(pos):
        y, s = labels_and_scores(neg, pos)
        row["auroc"] = auroc(y, s)
        row["auroc_ci"] = bootstrap_ci(y, s, "auroc", n_resamples=1000, seed=seed, max_cells=BOOTSTRAP_CELLS)
    if pos_flag is not None and len(pos):
        row.update({"caught": float(pos_flag.mean()), "caught_ci": wilson(int(pos_flag.sum()), len(pos))})
    if neg_flag is not None and len(neg):
        row["false_alarms"] = float(neg_flag.mean())
    return row


def summarize(result: AuditResult) -> dict[str, Any]:
    """Every number of the report (JSON-ready), from the per-sample records."""
    c, names, k = result.clean, result.class_names, len(result.class_names)
    seed = int(result.config.get("seed", 0))
    correct = c.correct
    mis = c.select(~correct)
    conf = confusion_matrix(c.label, c.pred, k)
    out: dict[str, Any] = {
        "n_images": len(c), "classes": names, "layers": result.layers, "threshold": result.threshold,
        "accuracy": {**_share(correct), "per_class": [
            {"class": names[j], **_share(correct[c.label == j])} for j in range(k)]},
        "confusion": conf,
        "flagged": {"correct": _share(c.flag[correct]), "mispredicted": _share(c.flag[~correct])},
        "calibration": result.calibration,
    }

    # NAD's claim: where does the path of an error lead?
    groups = {"mispredictions": mis}
    groups.update({f"adversarial: {a}": s for a, s in result.adversarial.items()})
    groups["correct predictions (reference)"] = c.select(correct)
    out["nad_claim"] = {
        "K": k, "groups": {g: _claim_group(s, k) for g, s in groups.items()},
        "chance": {m: _chance(rule, k) for m, _, rule in CLAIM_MEASURES},
        "chance_rule": {m: rule for m, _, rule in CLAIM_MEASURES},
        "measures": {m: label for m, label, _ in CLAIM_MEASURES},
    }

    # Similar sub-architectures vs confused classes
    sim = result.similarity
    iu = np.triu_indices(k, 1)
    pair_rate = _pair_rates(conf)
    svc: dict[str, Any] = {"similarity": sim, "errors": _spearman(sim[iu], pair_rate[iu])}
    order = np.argsort(-pair_rate[iu], kind="stable")
    svc["most_confused_pairs"] = [
        {"classes": [names[iu[0][i]], names[iu[1][i]]], "confusion_rate": float(pair_rate[iu][i]),
         "similarity": float(sim[iu][i]),
         "similarity_rank": int(1 + (sim[iu] > sim[iu][i]).sum())}
        for i in order[:10] if pair_rate[iu][i] > 0]
    if result.adversarial:
        adv = [s for s in result.adversarial.values() if len(s)]
        if adv:
            adv_conf = sum(confusion_matrix(s.label, s.pred, k) for s in adv)
            svc["adversarial_confusion"] = adv_conf
            svc["adversarial"] = _spearman(sim[iu], _pair_rates(adv_conf)[iu])
    out["similarity_vs_confusion"] = svc

    # Layer by layer
    lgroups = {"correct": c.select(correct), "mispredicted": mis}
    lgroups.update({f"adversarial: {a}": s for a, s in result.adversarial.items()})
    layers: dict[str, Any] = {}
    for g, s in lgroups.items():
        n = len(s)
        d = s.divergence
        mean = d.mean(0) if n else np.full(len(result.layers), np.nan)
        half = 1.959964 * d.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(len(result.layers), np.nan)
        layers[g] = {"n": n, "divergence_mean": mean, "divergence_ci_half": half,
                     "nearest_is_true": (s.layer_nearest == s.label[:, None]).mean(0) if n else mean,
                     "nearest_is_pred": (s.layer_nearest == s.pred[:, None]).mean(0) if n else mean}
    out["layers_by_group"] = layers

    # Separation of errors (and attacks) from correct predictions
    status = result.split.get("status")
    if status == "verified":
        basis = "evaluation"
        in_basis = _unseen(c.part)
        basis_note = ("measured only on the images the detector was neither fitted nor calibrated on (the "
                      f"evaluation part of its holdout split, and any image outside its sample): {int(in_basis.sum())}")
    elif status == "independent":
        basis, in_basis = "all", np.ones(len(c), dtype=bool)
        basis_note = "measured on all audited images: the detector was fitted and calibrated on another split"
    else:
        basis, in_basis = "all", np.ones(len(c), dtype=bool)
        basis_note = ("measured on all audited images, some of which the detector may have been fitted or "
                      "calibrated on (its holdout split could not be determined): optimistic")
    cb, mb = correct & in_basis, ~correct & in_basis
    rows = [_separation_row("mispredictions vs correct: suspicion score", c.score[cb], c.score[mb],
                            c.flag[cb], c.flag[mb], seed),
            _separation_row("mispredictions vs correct: classifier confidence (1 - max softmax; reference)",
                            1 - c.confidence[cb], 1 - c.confidence[mb], None, None, seed)]
    for a, s in result.adversarial.items():
        sb = _unseen(s.part) if basis == "evaluation" else np.ones(len(s), dtype=bool)
        rows.append(_separation_row(f"adversarial ({a}) vs correct: suspicion score", c.score[cb], s.score[sb],
                                    c.flag[cb], s.flag[sb], seed))
    if basis == "evaluation":
        rows.append(_separation_row("mispredictions vs correct, all audited images (includes the images the "
                                    "detector was fitted and calibrated on: optimistic)", c.score[correct],
                                    c.score[~correct], c.flag[correct], c.flag[~correct], seed))
    out["separation"] = {"basis": basis, "note": basis_note, "threshold": result.threshold,
                         "fpr_target": result.config.get("fpr"), "rows": rows}
    out["n_mispredictions"] = int((~correct).sum())
    out["mispredictions"] = _misprediction_rows(c, names, MAX_TABLE_ROWS)
    out["gallery"] = [{"index": g.position, "split_part": g.part, "true": g.label, "true_name": names[g.label],
                       "pred": g.pred, "pred_name": names[g.pred], "confidence": g.confidence,
                       "trust_score": g.trust, "suspicion_score": g.score, "flagged": g.flag,
                       "nearest_path_class": g.nearest_path, "nearest_path_class_name": names[g.nearest_path],
                       "true_class_path_rank": g.true_path_rank} for g in result.gallery]
    out["split"] = result.split
    out["attacks"] = result.attack_stats
    return out


def _misprediction_rows(c: Samples, names: list[str], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` least trusted mispredictions, least trusted first (all are in samples.csv)."""
    idx = np.flatnonzero(~c.correct)
    idx = idx[np.lexsort((c.position[idx], -c.score[idx], c.trust[idx]))][:limit]
    return [{"index": int(c.position[i]), "split_part": str(c.part[i]), "true": int(c.label[i]),
             "true_name": names[c.label[i]], "pred": int(c.pred[i]), "pred_name": names[c.pred[i]],
             "confidence": float(c.confidence[i]), "trust_score": float(c.trust[i]),
             "suspicion_score": float(c.score[i]), "flagged": bool(c.flag[i]),
             "nearest_path_class": int(c.nearest_path[i]), "nearest_path_class_name": names[c.nearest_path[i]],
             "true_class_path_rank": int(c.true_path_rank[i]), "classifier_true_rank": int(c.clf_true_rank[i])}
            for i in idx]


# --------------------------------------------------------------------------- files

CSV_COLUMNS = ("index", "input", "split_part", "true", "true_name", "pred", "pred_name", "correct", "confidence",
               "trust_score", "suspicion_score", "flagged", "nearest_path_class", "nearest_path_class_name",
               "true_class_path_rank", "classifier_true_rank")


def write_samples_csv(result: AuditResult, path: str | Path) -> Path:
    """One row per audited input (clean images first, then each attack's adversarial examples)."""
    path = Path(path)
    names = result.class_names
    header = list(CSV_COLUMNS) + [f"divergence:{l}" for l in result.layers] + \
        [f"nearest_class:{l}" for l in result.layers]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for kind, s in [(CLEAN, result.clean), *result.adversarial.items()]:
            for i in range(len(s)):
                y, p, npc = int(s.label[i]), int(s.pred[i]), int(s.nearest_path[i])
                w.writerow([int(s.position[i]), kind, s.part[i], y, names[y], p, names[p], int(y == p),
                            repr(float(s.confidence[i])), repr(float(s.trust[i])), repr(float(s.score[i])),
                            int(s.flag[i]), npc, names[npc], int(s.true_path_rank[i]), int(s.clf_true_rank[i]),
                            *(repr(float(v)) for v in s.divergence[i]), *(int(v) for v in s.layer_nearest[i])])
    return path


def write_report(result: AuditResult, out_dir: str | Path, *, command: str | None = None,
                 machine: dict[str, Any] | None = None, timings: dict[str, float] | None = None,
                 dpi: int = 90) -> dict[str, Path]:
    """Write ``index.html``, ``summary.json``, ``samples.csv`` and the PNG figures into ``out_dir``.

    ``command`` is recorded in the report (default: the Python API); ``timings`` (e.g. the CLI's load
    time) are added to the audit's own. Returns the written paths by name.
    """
    from nad_guard.runinfo import machine_info
    from nad_guard.metrics import write_json

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(result, out, dpi)
    files = {"samples.csv": write_samples_csv(result, out / "samples.csv")}
    tim = {**result.timings, **(timings or {})}
    tim["report_s"] = round(time.perf_counter() - t0, 3)
    if "load_s" in tim:
        tim["total_s"] = round(tim["load_s"] + tim["audit_s"] + tim["report_s"], 3)
        tim["total_without_attacks_s"] = round(tim["total_s"] - tim.get("attacks_s", 0.0), 3)
    summary = {"command": command or "nad_guard.audit.run_audit (Python API)", "config": result.config,
               "machine": machine or machine_info(), "timings": tim, "figures": [f.name for f in figs.values()],
               **result.summary}
    files["summary.json"] = write_json(out / "summary.json", summary)
    files["index.html"] = out / "index.html"
    files["index.html"].write_text(_html(result, summary, figs))
    return {**files, **{f"figure:{k}": v for k, v in figs.items()}}


# --------------------------------------------------------------------------- figures

def _figure(w: float, h: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)  # Agg canvas, no pyplot: no global backend state
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _short(name: str, n: int = 10) -> str:
    return name if len(name) <= n else name[:n - 1] + "."


def _figures(result: AuditResult, out: Path, dpi: int) -> dict[str, Path]:
    s = result.summary
    figs = {
        "confusion_similarity": _fig_confusion_similarity(result, out / "confusion_similarity.png", dpi),
        "similarity_vs_confusion": _fig_similarity_scatter(result, out / "similarity_vs_confusion.png", dpi),
        "nad_claim": _fig_claim(s, out / "nad_claim.png", dpi),
        "layers": _fig_layers(result, out / "layers.png", dpi),
        "roc": _fig_roc(result, out / "roc.png", dpi),
        "scores": _fig_scores(result, out / "scores.png", dpi),
    }
    if result.gallery:
        figs["gallery"] = _fig_gallery(result, out / "gallery.png", dpi)
    return figs


def _heatmap(fig, ax, m: np.ndarray, names: list[str], title: str, cmap: str, annotate: np.ndarray | None = None):
    k = len(names)
    im = ax.imshow(m, cmap=cmap, vmin=0, vmax=max(float(np.nanmax(m)) if np.isfinite(m).any() else 1.0, 1e-9))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    if k <= 20:
        ax.set_xticks(range(k), [_short(n, 6) for n in names], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [_short(n, 8) for n in names], fontsize=7)
    if annotate is not None and k <= 12:
        top = float(np.nanmax(m)) if np.isfinite(m).any() else 1.0
        for i in range(k):
            for j in range(k):
                if annotate[i, j]:
                    dark = np.isfinite(m[i, j]) and m[i, j] > 0.6 * top
                    ax.text(j, i, str(int(annotate[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")


def _fig_confusion_similarity(result: AuditResult, path: Path, dpi: int) -> Path:
    names = result.class_names
    conf = np.asarray(result.summary["confusion"], dtype=np.float64)
    rows = conf.sum(1, keepdims=True)
    rate = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    off = rate.copy()
    np.fill_diagonal(off, np.nan)
    sim = result.similarity.copy().astype(np.float64)
    np.fill_diagonal(sim, np.nan)
    cnt = conf.copy()
    np.fill_diagonal(cnt, 0)
    fig = _figure(10, 4.4, dpi)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _heatmap(fig, ax1, off, names, "confusion rate, row-normalised (diagonal left out;\nnumbers: counts)",
             "Reds", cnt)
    ax1.set(xlabel="predicted class", ylabel="true class")
    _heatmap(fig, ax2, sim, names, "sub-architecture similarity\n(mean Jaccard of masks; diagonal left out)", "Blues")
    ax2.set(xlabel="class", ylabel="class")
    return _save(fig, path)


def _fig_similarity_scatter(result: AuditResult, path: Path, dpi: int) -> Path:
    svc = result.summary["similarity_vs_confusion"]
    names, k = result.class_names, len(result.class_names)
    iu = np.triu_indices(k, 1)
    sim = result.similarity[iu]
    series = [("natural errors", _pair_rates(np.asarray(result.summary["confusion"]))[iu], svc["errors"], "C3")]
    if "adversarial_confusion" in svc:  # its own panel: adversarial rates are on another scale
        series.append(("adversarial examples (source -> adversarial prediction)",
                       _pair_rates(np.asarray(svc["adversarial_confusion"]))[iu], svc["adversarial"], "C0"))
    fig = _figure(5.0 * len(series), 4.2, dpi)
    for n, (label, rate, stat, color) in enumerate(series):
        ax = fig.add_subplot(1, len(series), n + 1)
        rho = f"Spearman {stat['rho']:.2f}, p = {stat['p_value']:.2g}" if stat["rho"] is not None else "undefined"
        ax.scatter(sim, rate, s=14, alpha=0.7, color=color)
        for i in np.argsort(-rate, kind="stable")[:5]:
            if rate[i] > 0:
                ax.annotate(f"{_short(names[iu[0][i]], 6)}-{_short(names[iu[1][i]], 6)}", (sim[i], rate[i]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("sub-architecture similarity of the pair")
        ax.set_ylabel("symmetrised confusion rate of the pair")
        ax.set_title(f"{label}\n{len(sim)} class pairs; {rho}", fontsize=8)
    return _save(fig, path)


def _fig_claim(s: dict[str, Any], path: Path, dpi: int) -> Path:
    claim = s["nad_claim"]
    groups = [g for g in claim["groups"] if not g.startswith("correct")]
    measures = [m for m, _, _ in CLAIM_MEASURES[:4]]
    labels = ["path: true class\nnearest", "path: true class\nin top 3", "classifier:\ntrue is 2nd",
              "classifier:\ntrue in top 3"]
    fig = _figure(7.5, 3.8, dpi)
    ax = fig.add_subplot()
    width = 0.8 / max(len(groups), 1)
    for gi, g in enumerate(groups):
        vals, lo, hi = [], [], []
        for m in measures:
            d = claim["groups"][g][m]
            v = d["share"] if d["share"] is not None else np.nan
            vals.append(v)
            lo.append(v - d["ci"][0] if d["ci"] else 0)
            hi.append(d["ci"][1] - v if d["ci"] else 0)
        x = np.arange(len(measures)) - 0.4 + width * (gi + 0.5)
        ax.bar(x, vals, width, yerr=[lo, hi], capsize=2, label=f"{g} (n={claim['groups'][g]['n']})",
               color=f"C{(3 if gi == 0 else gi - 1) % 10}", alpha=0.85)
    for i, m in enumerate(measures):
        ax.hlines(claim["chance"][m], i - 0.42, i + 0.42, colors="k", linestyles=":", linewidth=1.2,
                  label="chance" if i == 0 else None)
    ax.set_xticks(range(len(measures)), labels, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="share (95% Wilson interval)", title="Where do the errors' paths lead?")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _fig_layers(result: AuditResult, path: Path, dpi: int) -> Path:
    lg = result.summary["layers_by_group"]
    names = result.layers
    x = np.arange(len(names))
    fig = _figure(10, 3.9, dpi)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (g, d) in enumerate(lg.items()):
        if not d["n"]:
            continue
        color = {"correct": "C2", "mispredicted": "C3"}.get(g, f"C{(i - 2) % 10 if i > 1 else 0}")
        mean, half = np.asarray(d["divergence_mean"], float), np.asarray(d["divergence_ci_half"], float)
        ax1.plot(x, mean, marker="o", color=color, label=f"{g} (n={d['n']})")
        if np.isfinite(half).all():
            ax1.fill_between(x, mean - half, mean + half, color=color, alpha=0.15)
        ax2.plot(x, d["nearest_is_true"], marker="o", color=color, label=g)
    rot = 45 if len(names) > 5 else 0
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=rot, fontsize=7, ha="right" if rot else "center")
        ax.set_xlabel("gate point (input -> output)")
    ax1.set(ylabel="mean divergence (1 - mass share)", title="activation outside the predicted class's\n"
            "sub-architecture (band: 95% CI of the mean)")
    ax2.set(ylabel="share", ylim=(-0.02, 1.02), title="share of inputs whose nearest sub-architecture\n"
            "at this gate point is the true class")
    ax1.legend(fontsize=7)
    return _save(fig, path)


def _fig_roc(result: AuditResult, path: Path, dpi: int) -> Path:
    from nad_guard.metrics import labels_and_scores, roc_curve

    sep = result.summary["separation"]
    c = result.clean
    basis = _unseen(c.part) if sep["basis"] == "evaluation" else np.ones(len(c), dtype=bool)
    cb, mb = c.correct & basis, ~c.correct & basis
    fig = _figure(5.2, 4.8, dpi)
    ax = fig.add_subplot()
    curves = [("mispredictions: suspicion score", c.score[cb], c.score[mb], c.flag[cb], c.flag[mb], "C3", "-"),
              ("mispredictions: 1 - confidence", 1 - c.confidence[cb], 1 - c.confidence[mb], None, None, "C7", "--")]
    for i, (a, s) in enumerate(result.adversarial.items()):
        sb = _unseen(s.part) if sep["basis"] == "evaluation" else np.ones(len(s), dtype=bool)
        curves.append((f"adversarial {a}: suspicion score", c.score[cb], s.score[sb], c.flag[cb], s.flag[sb],
                       f"C{i}", "-"))
    plotted = 0
    for (label, neg, pos, nf, pf, color, ls), row in zip(curves, sep["rows"]):
        if not len(neg) or not len(pos):
            continue
        plotted += 1
        f, t, _ = roc_curve(*labels_and_scores(neg, pos))
        ax.plot(f, t, color=color, linestyle=ls, label=f"{label} (AUROC {row['auroc']:.3f}, n+={len(pos)})")
        if nf is not None:
            ax.plot([nf.mean()], [pf.mean()], marker="o", color=color, markersize=5)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false alarm rate (correct predictions flagged)", ylabel="share of errors flagged",
           xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC ({'evaluation part' if sep['basis'] == 'evaluation' else 'all images'}); "
                 "dots: calibrated threshold")
    if plotted:
        ax.legend(loc="lower right", fontsize=6)
    else:
        ax.text(0.5, 0.5, "nothing to separate:\nno errors or no correct predictions", ha="center", va="center")
    return _save(fig, path)


def _fig_scores(result: AuditResult, path: Path, dpi: int) -> Path:
    c = result.clean
    groups = [("correct", c.score[c.correct], "C2"), ("mispredicted", c.score[~c.correct], "C3")]
    for i, (a, s) in enumerate(result.adversarial.items()):
        groups.append((f"adversarial {a}", s.score, f"C{i}"))
    allv = np.concatenate([g[1] for g in groups if len(g[1])])
    lo, hi = float(min(allv.min(), result.threshold)), float(max(allv.max(), result.threshold))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    fig = _figure(6, 3.6, dpi)
    ax = fig.add_subplot()
    for label, v, color in groups:
        if len(v):
            ax.hist(v, bins=bins, histtype="step", density=True, color=color, linewidth=1.4,
                    label=f"{label} (n={len(v)})")
    ax.axvline(result.threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {result.threshold:.3g}")
    ax.set_yscale("log")
    ax.set(xlabel="suspicion score (higher = more suspicious)", ylabel="density (log)",
           title="suspicion scores of all audited inputs")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _fig_gallery(result: AuditResult, path: Path, dpi: int) -> Path:
    items, names = result.gallery, result.class_names
    cols = min(8, len(items))
    rows = math.ceil(len(items) / cols)
    fig = _figure(1.5 * cols, 1.9 * rows, dpi)
    for i, g in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = g.image
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(np.transpose(img[:3], (1, 2, 0)))
        ax.set_xticks([])
        ax.set_yticks([])
        color = "C3" if g.label != g.pred else "k"
        ax.set_title(f"#{g.position} {_short(names[g.label], 7)}->{_short(names[g.pred], 7)}\n"
                     f"trust {g.trust:.3f} path {_short(names[g.nearest_path], 7)}", fontsize=7, color=color)
    return _save(fig, path)


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
.note { color: #555; font-size: 0.92em; } .bad { color: #b00; } code { background: #f5f5f5; padding: 0 3px; }
.kv td:first-child { text-align: left; font-weight: bold; } .scroll { max-height: 520px; overflow-y: auto; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _f(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(float(v), fmt)


def _ci(ci: Any, fmt: str = ".3f") -> str:
    return f"[{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]" if ci else "n/a"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(figs: dict[str, Path], key: str, alt: str) -> str:
    return f'<img src="{_e(figs[key].name)}" alt="{_e(alt)}">' if key in figs else ""


def _html(result: AuditResult, s: dict[str, Any], figs: dict[str, Path]) -> str:
    names, k, cfg = result.class_names, len(result.class_names), s["config"]
    acc = s["accuracy"]
    mis_n = acc["n"] - acc["k"]
    parts: list[str] = []
    add = parts.append
    add(f"<h1>Audit of mispredictions: {_e(cfg['model'])} on {_e(cfg['data'])}</h1>")
    sample = f" (a seeded stratified sample of {cfg['split_images']})" if acc["n"] < cfg["split_images"] else ""
    add(f"<p>{acc['n']} images audited{sample}"
        f"; {mis_n} mispredicted. Guard: <code>{_e(cfg['guard'] or 'in memory')}</code> "
        f"(detector <code>{_e(cfg['detector_method'])}</code>, encoding <code>{_e(cfg['encoding'])}</code>, "
        f"threshold {_f(result.threshold, '.4g')} at {_f(cfg['fpr'], '.0%') if cfg['fpr'] is not None else 'n/a'} "
        f"false positives). {len(result.layers)} gate points, {k} classes.</p>")
    add(f"<p class=\"note\">Command: <code>{_e(s['command'])}</code><br>Run time: "
        f"{_f(s['timings'].get('total_s', s['timings'].get('audit_s')), '.1f')} s; "
        f"machine: {_e(s['machine'].get('cpu'))}, "
        f"{_e(s['machine'].get('cores'))} cores, device {_e(cfg['device'])}. Definitions of every quantity are at the "
        "end of the page.</p>")

    # 1. accuracy and confusion
    add("<h2>1. How accurate is the classifier, and which classes does it confuse?</h2>")
    add(f"<p>Accuracy <b>{_f(acc['share'], '.4f')}</b> ({acc['k']} of {acc['n']}; 95% Wilson interval "
        f"{_ci(acc['ci'], '.4f')}).</p>")
    add(_img(figs, "confusion_similarity", "confusion matrix and sub-architecture similarity"))
    if k <= 20:
        conf = np.asarray(s["confusion"])
        add("<p class=\"note\">Confusion matrix (rows: true class, columns: predicted class, counts):</p>")
        add(_table(["true \\ predicted", *names, "accuracy"],
                   ([_e(names[i]),
                     *[(f"<b>{v}</b>" if i == j else (str(v) if v else "·")) for j, v in enumerate(conf[i])],
                     _f(acc["per_class"][i]["share"])] for i in range(k))))

    # 2. each misprediction
    add("<h2>2. Each misprediction: what was predicted, how far was it trusted, where did its path go?</h2>")
    shown = s["mispredictions"]
    if not shown:
        add("<p>No mispredictions.</p>")
    else:
        n_all = s["n_mispredictions"]
        cut = f"; the first {len(shown)} are shown, all are in <code>samples.csv</code>" if len(shown) < n_all else ""
        add(f"<p>{n_all} mispredictions, least trusted first{cut}. "
            "<i>Path rank of true class</i>: where the true class's sub-architecture ranks among all "
            f"{k} by path similarity (1 = nearest).</p>")
        add('<div class="scroll">' + _table(
            ["index", "part", "true", "predicted", "confidence", "trust", "flagged", "nearest path",
             "path rank of true class", "classifier rank of true class"],
            ([str(r["index"]), _e(r["split_part"]), _e(r["true_name"]), _e(r["pred_name"]), _f(r["confidence"]),
              _f(r["trust_score"]), "yes" if r["flagged"] else '<span class="bad">no</span>',
              _e(r["nearest_path_class_name"]), str(r["true_class_path_rank"]), str(r["classifier_true_rank"])]
             for r in shown), left=4) + "</div>")

    # 3. NAD claim
    claim = s["nad_claim"]
    add("<h2>3. Does an error's path lead to its true class's sub-architecture? (NAD's claim, measured)</h2>")
    add(f"<p>Neural Architecture Disentanglement suggests that a misclassified input still flows through "
        f"(or near) its true class's sub-architecture. For each error group: the share whose path is nearest to the "
        f"true class's sub-architecture, or has it among the 3 nearest, next to chance (1/K = {_f(1 / k)}, "
        f"3/K = {_f(min(3, k) / k)}) and next to the classifier's own ranking of the true class (for an error, the "
        f"true class can only be the classifier's 2nd or later choice: chance 1/(K-1) for 2nd, 2/(K-1) for top 3). "
        "Intervals: 95% Wilson.</p>")
    gnames = list(claim["groups"])
    add(_table(["measure", "chance", *[f"{g} (n={claim['groups'][g]['n']})" for g in gnames]],
               ([_e(label), f"{_f(claim['chance'][m])} ({claim['chance_rule'][m]})",
                 *[(f"<b>{_f(claim['groups'][g][m]['share'])}</b> {_ci(claim['groups'][g][m]['ci'])}"
                    if claim["groups"][g][m]["n"] else "n/a") for g in gnames]]
                for m, label, _ in CLAIM_MEASURES)))
    add(_img(figs, "nad_claim", "NAD claim shares with intervals"))

    # 4. similarity vs confusion
    svc = s["similarity_vs_confusion"]
    add("<h2>4. Are classes with similar sub-architectures the ones the model confuses?</h2>")

    def rho_txt(st: dict[str, Any]) -> str:
        if st["rho"] is None:
            return f"undefined ({_e(st.get('note', ''))})"
        return (f"Spearman ρ = <b>{_f(st['rho'])}</b> (p = {_f(st['p_value'], '.2g')}) over {st['n_pairs']} "
                "class pairs, "
                f"{st['n_pairs_confused']} of them confused at least once")
    add(f"<p>Each class pair's sub-architecture similarity (mean Jaccard index of the two classes' masks over the "
        f"gate points) against how often the model confuses the pair (row-normalised confusion rate, averaged over "
        f"both directions). Natural errors: {rho_txt(svc['errors'])}."
        + (f" Adversarial examples (source class → adversarial prediction): {rho_txt(svc['adversarial'])}."
           if "adversarial" in svc else "") + "</p>")
    add(_img(figs, "similarity_vs_confusion", "similarity against confusion rate per class pair"))
    if svc["most_confused_pairs"]:
        add(_table(["most confused pairs", "confusion rate", "similarity", f"similarity rank (of {k * (k - 1) // 2})"],
                   ([_e(" / ".join(p["classes"])), _f(p["confusion_rate"]), _f(p["similarity"]),
                     str(p["similarity_rank"])] for p in svc["most_confused_pairs"])))

    # 5. layers
    add("<h2>5. Where does the flow go wrong? Layer by layer, from input to output</h2>")
    add("<p>Left: the mean per-layer <i>divergence</i>, the share of the layer's pooled activation that lies outside "
        "the predicted class's sub-architecture (0 = entirely inside). Right: the share of inputs whose nearest "
        "sub-architecture at that gate point (by the per-layer class score) is the true class: where it drops for "
        "errors, the path has left the true class.</p>")
    add(_img(figs, "layers", "per-layer divergence curves"))
    lg = s["layers_by_group"]
    add(_table(["group", "n", *[f"{_e(l)}" for l in result.layers]],
               ([_e(g), str(d["n"]), *[f"{_f(m)} ± {_f(h)}<br><span class=\"note\">true nearest {_f(t, '.2f')}</span>"
                                       for m, h, t in zip(d["divergence_mean"], d["divergence_ci_half"],
                                                          d["nearest_is_true"])]]
                for g, d in lg.items()), left=1))

    # 6. separation
    sep = s["separation"]
    add("<h2>6. How well does the trust score separate errors from correct predictions?</h2>")
    learned = s["split"].get("detector_fit_mispredicted")
    add(f"<p><b>Basis:</b> {_e(sep['note'])}.<br><b>Which images the detector saw:</b> {_e(s['split']['note'])}."
        + (f" The detector was trained on the {learned} mispredictions of its fit part as well (as suspicious "
           "inputs), so errors of that part are not a fair test of it." if learned else "") + "</p>")
    add(f"<p>AUROC: the probability that an error gets a higher suspicion score than a correct prediction (0.5 = no "
        f"better than chance; 95% stratified bootstrap interval). <i>Caught</i>: the share of errors flagged at the "
        f"calibrated threshold ({_f(result.threshold, '.4g')}, calibrated on the clean calibration images for a "
        f"false-positive rate of {_f(cfg['fpr'], '.0%') if cfg['fpr'] is not None else 'n/a'}; flagged = "
        "suspicion score above it); <i>false alarms</i>: the share of correct predictions flagged. The ROC uses the "
        "suspicion score (the trust score is a step function of it). The classifier's own confidence is shown for "
        "reference.</p>")
    cal = s.get("calibration") or {}
    if cal:
        add(f"<p><b>Calibration</b> (split conformal; <code>nad_guard.calibration</code>): {_e(cal['summary'])}, "
            "for clean inputs drawn like the calibration images.</p>")
        if cal.get("warning"):
            add(f'<p class="bad"><b>Warning:</b> {_e(cal["warning"])}.</p>')
    add(_table(["what", "positives", "correct", "AUROC", "AUROC 95% CI", "caught", "caught 95% CI", "false alarms"],
               ([_e(r["what"]), str(r["n_positive"]), str(r["n_correct"]), _f(r["auroc"]), _ci(r["auroc_ci"]),
                 _f(r["caught"]), _ci(r["caught_ci"]), _f(r["false_alarms"])] for r in sep["rows"])))
    add(_img(figs, "roc", "ROC curves"))
    add(_img(figs, "scores", "suspicion score histograms"))

    # 7. gallery
    add("<h2>7. Which inputs does the guard trust least?</h2>")
    if s["gallery"]:
        add(f"<p>The {len(s['gallery'])} least trusted audited images (lowest trust, then highest suspicion score); "
            "titles: index, true → predicted class (red: mispredicted), trust score, nearest path class.</p>")
        add(_img(figs, "gallery", "least trusted inputs"))
        add('<div class="scroll">' + _table(
            ["index", "part", "true", "predicted", "confidence", "trust", "suspicion", "flagged", "nearest path",
             "path rank of true class"],
            ([str(g["index"]), _e(g["split_part"]), _e(g["true_name"]), _e(g["pred_name"]), _f(g["confidence"]),
              _f(g["trust_score"]), _f(g["suspicion_score"]), "yes" if g["flagged"] else "no",
              _e(g["nearest_path_class_name"]), str(g["true_class_path_rank"])] for g in s["gallery"]), left=4)
            + "</div>")
    else:
        add("<p>No gallery (gallery size 0).</p>")

    # 8. how it was made
    add("<h2>8. How this report was made</h2>")
    if s["attacks"]:
        add("<p>Attacks (made only on correctly classified images; only successful ones kept):</p>")
        add(_table(["attack", "attacked", "kept", "success rate", "mean L-inf", "mean L2", "seconds", "from cache"],
                   ([_e(a), str(v["attacked"]), str(v["kept"]), _f(v["success_rate"]), _f(v["mean_linf"]),
                     _f(v["mean_l2"]), _f(v["generation_seconds"], ".1f"), str(v["from_cache"])]
                    for a, v in s["attacks"].items())))
    split = s["split"]
    add(_table(["setting", "value"], ([_e(key), _e(v)] for key, v in
                                      [*cfg.items(), ("detector split status", split.get("status")),
                                       ("detector fit set", split.get("detector_fit_set")),
                                       ("detector calibration set", split.get("detector_calibration_set"))]), left=2))
    add(_table(["timing", "seconds"], ([_e(key), _e(v)] for key, v in s["timings"].items())))
    add(_table(["machine", "value"], ([_e(key), _e(v)] for key, v in s["machine"].items()), left=2))
    add("<h3>Definitions</h3><ul class=\"note\">"
        "<li><b>sub-architecture</b> of class k: its binary channel mask at every gate point (learned by NAD).</li>"
        "<li><b>path similarity</b> (N × K): the mean over gate points of the per-layer score of class k's "
        "sub-architecture for the input's path (<code>nad_guard.paths.path_similarity</code>; higher = nearer); "
        "<b>nearest path class</b> = its argmax (lowest index on ties); "
        "<b>path rank of the true class</b> = 1 + the number of classes with a strictly higher similarity.</li>"
        "<li><b>classifier rank of the true class</b> = 1 + the number of classes with a strictly higher logit.</li>"
        "<li><b>divergence</b> at a gate point = 1 − mass share: the share of pooled activation outside the "
        "predicted class's mask.</li>"
        "<li><b>suspicion score</b>: the detector's score, higher = more suspicious; <b>trust</b>: its conformal "
        "p-value among the clean calibration scores, in (0, 1], higher = more trustworthy; <b>flagged</b>: score "
        "above the calibrated threshold.</li>"
        "<li><b>split part</b>: detector-fit / calibration / evaluation part of the detector's holdout split, "
        f"{PART_INDEPENDENT} (another split), or {PART_UNKNOWN}.</li></ul>")
    add("<p class=\"note\">Files: <code>summary.json</code> (every number here), <code>samples.csv</code> (one row "
        "per audited input, with per-layer divergence), "
        + ", ".join(f"<code>{_e(f.name)}</code>" for f in figs.values())
        + ".</p>")
    title = f"nad-guard audit: {cfg['model']} on {cfg['data']}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def resolve_guard_dir(artifact: str | Path) -> Path:
    """``"default"`` -> the bundled default guard; otherwise the path, which must be a directory."""
    if str(artifact) == "default":
        return DEFAULT_GUARD_DIR
    path = Path(artifact)
    if not path.exists():
        raise AuditError(f"guard directory {path} does not exist; pass a guard written by `nad-guard fit-detector` "
                         "(meta.json, paths.safetensors, classifier.safetensors, detector.skops) or 'default'")
    if not path.is_dir():
        raise AuditError(f"{path} is a file; --artifact takes a guard directory (meta.json, paths.safetensors, "
                         "classifier.safetensors, detector.skops) or 'default'")
    return path


def guard_data(guard: Guard) -> tuple[str | None, str | None]:
    """``(data set, split)`` the guard's detector was fitted on, from its provenance record (or, for guards
    without one, the name of its fit set); ``None`` where unknown."""
    det = guard.meta.get("detector") or {}
    record = det.get("provenance")
    if isinstance(record, dict) and record.get("data") in DATASETS:
        return record["data"], record.get("split")
    fit_set = det.get("fit_set")
    if not isinstance(fit_set, str) or "/" not in fit_set:
        return None, None
    base = fit_set.split("[", 1)[0]
    name, _, split = base.partition("/")
    name = name.split(":", 1)[0]
    return (name if name in DATASETS else None), (split or None)


__all__ = ["AuditError", "AuditResult", "GalleryItem", "Samples", "check_fits", "confusion_matrix", "guard_data",
           "calibration_record", "holdout_parts", "load_split", "resolve_guard_dir", "run_audit", "summarize", "wilson",
           "write_report", "write_samples_csv"]
