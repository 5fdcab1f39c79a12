"""Generating adversarial examples: :func:`generate` (one attack: the clean set, the success
filter, projection, per-batch seeds, the cache) and :func:`generate_suite` (every attack of a suite)."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchattacks
from torch import nn

from nad_guard.attacks.cache import cache_key, data_hash, model_hash
from nad_guard.attacks.implementations import build_attack
from nad_guard.attacks.results import AttackResult, AttackStats
from nad_guard.attacks.suites import AttackSpec, AttackSuite, get_suite
from nad_guard.data import ImageSet

PROJECTION_TOL = 1e-6


def _as_inputs(images: ImageSet | torch.Tensor, labels: torch.Tensor | None
               ) -> tuple[Any, torch.Tensor]:
    """Returns (a function index -> float batch, labels)."""
    if isinstance(images, ImageSet):
        if labels is not None:
            raise ValueError("labels come from the ImageSet; pass labels=None")
        return (lambda idx: images.images[idx].float().div_(255.0)), images.labels
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError("images must be an ImageSet or a float (N, C, H, W) tensor in [0, 1]")
    if labels is None:
        raise ValueError("labels are required when images is a tensor")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must lie in [0, 1]")
    return (lambda idx: images[idx].float()), labels


def _project(x: torch.Tensor, adv: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Project ``adv`` to ``spec``'s ball around ``x`` (if bounded) and to ``[0, 1]``, and check."""
    delta = adv - x
    if spec.eps is not None and spec.norm == "Linf":
        delta = delta.clamp(-spec.eps, spec.eps)
    elif spec.eps is not None and spec.norm == "L2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * torch.clamp(spec.eps / n, max=1.0).view(-1, *[1] * (x.ndim - 1))
    adv = (x + delta).clamp(0, 1)
    d = (adv - x).flatten(1)
    if spec.eps is not None:
        size = d.abs().amax(1) if spec.norm == "Linf" else d.norm(dim=1)
        if size.numel() and size.max().item() > spec.eps + PROJECTION_TOL:
            raise RuntimeError(f"projection failed: {spec.norm} size {size.max().item()} > eps {spec.eps}")
    if adv.numel() and (adv.min() < 0 or adv.max() > 1):
        raise RuntimeError("projection failed: images outside [0, 1]")
    return adv


@torch.no_grad()
def _predict(model: nn.Module, get, n: int, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        out.append(model(get(idx).to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def generate(model: nn.Module, images: ImageSet | torch.Tensor, labels: torch.Tensor | None = None,
             attack: str = "pgd", suite: str | AttackSuite = "mnist", batch_size: int = 128,
             device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
             progress: bool = True) -> AttackResult:
    """Attack the correctly classified images of ``images`` with ``suite[attack]``.

    Args:
        model: a classifier on ``[0, 1]`` inputs returning logits (a :class:`~nad_guard.models.Classifier`);
            it is moved to ``device``.
        images: an :class:`ImageSet`, or a float ``(N, C, H, W)`` tensor in ``[0, 1]`` with ``labels``.
        attack: a name in the suite (see the :mod:`nad_guard.attacks` docstring).
        suite: a suite name for :func:`get_suite` or an :class:`AttackSuite`.
        batch_size: images per attack call; bounds memory. Part of the cache key.
        cache_dir: where results are cached; ``None`` disables caching.
        progress: show a tqdm bar over batches.

    Returns:
        :class:`AttackResult` with the successful adversarial examples (every sample for the noise
        controls) and their stats.
    """
    from tqdm.auto import tqdm

    suite = get_suite(suite) if isinstance(suite, str) else suite
    spec = suite[attack]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    get, labels = _as_inputs(images, labels)
    model = model.to(device)
    model.eval()

    stem = key = None
    if cache_dir is not None:
        key = cache_key(model_hash(model), data_hash(images, labels), attack, spec, batch_size)
        name = getattr(model, "name", type(model).__name__)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{name}__{attack}")  # no dots: suffixes
        stem = Path(cache_dir) / f"{safe}__{key[:24]}"
        if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
            try:
                result = AttackResult.load(stem)
                if result.key == key:
                    return result
                warnings.warn(f"cache entry {stem} has another key; regenerating")
            except Exception as e:  # a damaged entry is regenerated, not trusted
                warnings.warn(f"cannot read cache entry {stem} ({e}); regenerating")

    t0 = time.perf_counter()
    n = int(labels.shape[0])
    clean_pred = _predict(model, get, n, batch_size, device)
    clean_idx = torch.nonzero(clean_pred == labels).flatten()
    keep_all = spec.kind == "noise"
    atk = build_attack(model, spec)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("adv", "idx", "pred", "succ", "linf", "l2")}
    n_success = 0
    n_batches = math.ceil(len(clean_idx) / batch_size)
    for b in tqdm(range(n_batches), desc=attack, disable=not progress, leave=False):
        idx = clean_idx[b * batch_size:(b + 1) * batch_size]
        # contiguous: torchattacks' PGD-L2 and others call .view() on tensors shaped like x
        x, y = get(idx).to(device).contiguous(), labels[idx].to(device)
        seed = spec.seed + b
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(seed)
            if hasattr(atk, "seed"):
                atk.seed = seed  # APGD and Square reseed the global RNG themselves
            adv = atk(x, y)
        adv = _project(x, adv.detach().float(), spec)
        with torch.no_grad():
            pred = model(adv).argmax(1)
        succ = pred != y
        n_success += int(succ.sum())
        keep = torch.ones_like(succ) if keep_all else succ
        delta = (adv[keep] - x[keep]).flatten(1)
        out["adv"].append(adv[keep].cpu())
        out["idx"].append(idx[keep.cpu()])
        out["pred"].append(pred[keep].cpu())
        out["succ"].append(succ[keep].cpu())
        out["linf"].append(delta.abs().amax(1).cpu())
        out["l2"].append(delta.norm(dim=1).cpu())
    seconds = time.perf_counter() - t0

    def cat(k: str, empty: torch.Tensor) -> torch.Tensor:
        return torch.cat(out[k]) if out[k] else empty

    image_shape = tuple(get(torch.arange(1)).shape[1:]) if n else (0, 0, 0)
    adv_images = cat("adv", torch.zeros((0, *image_shape)))
    indices = cat("idx", torch.zeros(0, dtype=torch.long))
    linf, l2 = cat("linf", torch.zeros(0)), cat("l2", torch.zeros(0))
    stats = AttackStats(
        attack=attack, n_images=n, n_correct=len(clean_idx), n_kept=len(indices), n_success=n_success,
        success_rate=n_success / max(len(clean_idx), 1),
        mean_linf=float(linf.mean()) if len(linf) else float("nan"),
        mean_l2=float(l2.mean()) if len(l2) else float("nan"), seconds=seconds)
    result = AttackResult(
        attack=attack, suite=suite.name, spec=spec, key=key or "", adv_images=adv_images.float().contiguous(),
        indices=indices.long(), labels=labels[indices].long(),
        adv_preds=cat("pred", torch.zeros(0, dtype=torch.long)).long(),
        success=cat("succ", torch.zeros(0, dtype=torch.bool)).bool(),
        linf=linf.float(), l2=l2.float(), clean_indices=clean_idx.long(), stats=stats)
    if stem is not None:
        result.save(stem, meta={
            "model": getattr(model, "name", type(model).__name__), "batch_size": batch_size,
            "data": getattr(images, "name", "tensor"), "device": str(device), "torch": torch.__version__,
            "torchattacks": torchattacks.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return result


def generate_suite(model: nn.Module, images: ImageSet | torch.Tensor, labels: torch.Tensor | None = None,
                   suite: str | AttackSuite = "mnist", attacks: list[str] | None = None,
                   batch_size: int = 128, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, AttackResult]:
    """:func:`generate` for each attack of ``suite`` (or the given subset), in order."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    return {a: generate(model, images, labels, a, suite, batch_size, device, cache_dir, progress)
            for a in (attacks or suite.names)}
