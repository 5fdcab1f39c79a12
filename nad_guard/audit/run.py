"""The audit itself: :func:`run_audit` streams a split (and, optionally, its adversarial examples)
through the guard in batches, keeping per input only the scalars of :class:`~nad_guard.audit.records.Samples`
and the images of the least trusted inputs, and computes the report's numbers
(:func:`nad_guard.audit.stats.summarize`)."""

from __future__ import annotations

import heapq
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from nad_guard.audit.claims import claims_pass
from nad_guard.audit.saliency import SALIENCY_IMAGES
from nad_guard.audit.split_parts import holdout_parts, unseen
from nad_guard.audit.inputs import AuditError, check_fits
from nad_guard.audit.records import AuditResult, GalleryItem, Samples
from nad_guard.audit.stats import summarize
from nad_guard.data import ImageSet, sample_size, stratified_split
from nad_guard.guard import Guard, GuardResult
from nad_guard.provenance import exhausted_split
from nad_guard.runinfo import portable_path

GALLERY_SIZE = 24
ATTACK_CHUNK = 2048   # images per attack call: bounds the adversarial images held at once
SCALARS = ("label", "pred", "confidence", "trust", "score", "flag", "nearest_path", "true_path_rank",
           "clf_true_rank")


# --------------------------------------------------------------------------- per-sample records

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
        **({"attack_trust": np.asarray(r.attack_trust, dtype=np.float64),
            "error_trust": np.asarray(r.error_trust, dtype=np.float64)} if r.error_trust is not None else {}),
    }


# --------------------------------------------------------------------------- gallery

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


# --------------------------------------------------------------------------- the passes

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
              source: str | None = None, log: Callable[[str], None] | None = None,
              saliency_images: int = SALIENCY_IMAGES, explain: bool = True, encoder: Any = None,
              encoder_source: str | None = None) -> AuditResult:
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
        saliency_images: correctly classified images (seeded sample) of the subnetwork-explanation test
            (:mod:`nad_guard.audit.saliency`); 0 skips it.
        explain: explain every misprediction's path and deciding filters (:mod:`nad_guard.audit.explain`).
        encoder: an NND architecture encoder of the guard's classifier
            (:class:`~nad_guard.encoder.ArchitectureEncoder`): its class-average gates become a second
            class-path source of the claims (:func:`~nad_guard.audit.class_paths.class_paths_from_encoder`);
            ``encoder_source`` (a directory) is recorded in the report's config.

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
        if sample_size(max_images, data, "audited split") is not None:
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
        src = positions[unseen(clean.part)] if split["status"] == "verified" else positions
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

    if saliency_images < 0:
        raise AuditError(f"saliency_images must be 0 (skip) or positive, got {saliency_images}")
    t0 = time.perf_counter()
    if encoder is not None:
        if encoder.classifier is not guard.classifier:
            raise AuditError("the encoder must be loaded for the guard's classifier "
                             "(ArchitectureEncoder.load(directory, guard.classifier))")
        encoder.to(dev)
    claims = claims_pass(guard, data, clean, saliency_images=saliency_images, explain=explain, seed=seed,
                         encoder=encoder, batch_size=batch_size, log=log)
    t_claims = time.perf_counter() - t0

    det = guard.meta.get("detector") or {}
    config = {
        "guard": source, "model": guard.classifier.name,
        "detector_method": det.get("method"), "encoding": guard.encoding, "fpr": det.get("fpr"),
        "data": data.name, "split_images": n_split, "max_images": max_images, "audited_images": len(clean),
        "attack_suite": getattr(suite_obj, "name", None), "attacks": list(adversarial) or None,
        "attack_images": attack_images, "batch_size": batch_size, "attack_batch_size": attack_batch_size,
        "gallery_size": gallery_size, "device": str(dev), "seed": seed, "saliency_images": saliency_images,
        "explain": explain, "encoder": (encoder_source or "given") if encoder is not None else None,
        "cache_dir": portable_path(cache_dir) if cache_dir is not None else None,
    }
    if guard.error_detector is not None:  # two detectors (nad_guard.errors): the rate and its split
        config.update(fpr=guard.fpr, attack_fpr=guard.detector.fpr_, error_fpr=guard.error_detector.fpr_,
                      error_detector_method=guard.error_detector.method)
    result = AuditResult(
        clean=clean, adversarial=adversarial, gallery=gallery.items(), class_names=list(guard.classifier.class_names),
        layers=list(guard.paths.layer_names_), similarity=guard.paths.similarity().numpy(),
        threshold=float(guard.detector.threshold_), split=split, config=config, attack_stats=attack_stats,
        timings={"clean_pass_s": round(t_clean, 3), "attacks_s": round(t_attack, 3),
                 "claims_s": round(t_claims, 3), **claims["timings"]},
        calibration=calibration_record(guard), class_paths=claims["class_paths"],
        explanations=claims["explanations"], saliency=claims["saliency"])
    t0 = time.perf_counter()
    result.summary = summarize(result)
    result.timings["metrics_s"] = round(time.perf_counter() - t0, 3)
    result.timings["audit_s"] = round(time.perf_counter() - t_start, 3)
    result.timings["images_per_s"] = round(len(clean) / max(t_clean, 1e-9), 1)
    return result


def calibration_record(guard: Guard) -> dict[str, Any]:
    """What the guard's clean calibration set guarantees about its false-positive rate
    (:meth:`PathDetector.calibration <nad_guard.detectors.PathDetector.calibration>`), with a one-line
    ``summary``; ``warning`` is set when the set is too small for a tight bound (its advice: from the
    provenance record, :func:`nad_guard.provenance.exhausted_split`)."""
    g = guard.detector.calibration(**exhausted_split((guard.meta.get("detector") or {}).get("provenance")))
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
