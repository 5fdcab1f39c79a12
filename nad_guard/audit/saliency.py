"""The subnetwork-explanation claim (Wang, Su & Hu 2019: an explanation computed through the predicted
class's subnetwork is more accurate than one through the full model), measured by a deletion metric.

Protocol (:func:`subnetwork_explanations`), on a seeded sample of correctly classified images:

1. Saliency (Simonyan et al. 2014): the gradient of the predicted class's logit with respect to the
   input pixels, reduced over colour channels by the maximum absolute value, ``(H, W)``; once through the
   full classifier and once through the predicted class's subnetwork (every gate point's output
   multiplied by that class's binary mask: :meth:`PathModel.subnetwork_logits
   <nad_guard.paths.PathModel.subnetwork_logits>`). A third, seeded random pixel order is the reference.
2. Deletion (Petsiuk et al. 2018, RISE): pixels are removed in saliency order (highest first; ties by
   position), in ``steps`` equal steps of ``ceil(H * W / steps)`` pixels; a removed pixel is set to
   ``baseline`` (0, black, in every channel). After each step the FULL classifier's softmax probability of
   the originally predicted class is read; the curve has ``steps + 1`` points at removed fractions
   ``0, 1/steps, ..., 1``, and its area (trapezoidal rule over the fraction) is the deletion AUC.
   Lower is better: the pixels the explanation ranks first are the ones the classifier needs.
3. Comparison, paired per image: ``AUC_subnetwork - AUC_full``; its mean with a seeded bootstrap 95%
   interval (2,000 resamples of the images) and the Wilcoxon signed-rank test (two-sided). The claim
   is supported when the interval lies below 0.
4. The same with a second baseline, a Gaussian-blurred copy of the image (sigma :data:`BLUR_SIGMA`
   pixels), as the removed pixels' value: scattered black pixels are far from the images a classifier
   was trained on and can lower its confidence whatever their place (a random order can then beat
   any saliency); blurred pixels carry less of that.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

SALIENCY_IMAGES = 200   # correctly classified images in the sample
DELETION_STEPS = 10     # deletion steps (curve points: steps + 1)
BOOTSTRAP = 2000        # paired bootstrap resamples
ORDERS = ("subnetwork", "full", "random")
BLUR_SIGMA = 2.0        # the blurred baseline's Gaussian (pixels)


def gradient_saliency(logit_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      classes: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)``: ``max_c |d logit_fn(x)[i, classes[i]] / d x[i, c]|`` (the logits of each row depend on
    that row only, so one backward pass serves the batch)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = logit_fn(x)
        chosen = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(chosen, x)
    return grad.abs().amax(1)


def deletion_orders(saliency: torch.Tensor) -> torch.Tensor:
    """``(N, H * W)`` pixel positions, most salient first (a stable sort: ties keep position order)."""
    flat = saliency.flatten(1)
    return torch.sort(-flat, dim=1, stable=True).indices


def deletion_curves(prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: torch.Tensor,
                    orders: torch.Tensor, steps: int = DELETION_STEPS, baseline: float | torch.Tensor = 0.0,
                    batch_size: int = 256) -> np.ndarray:
    """``(N, steps + 1)``: ``prob_fn``'s probability of ``classes[i]`` after removing the first
    ``min(j * ceil(H * W / steps), H * W)`` pixels of ``orders[i]``, ``j = 0..steps``; a removed pixel takes
    ``baseline``'s value (a number for every channel, or a tensor shaped like ``x``, e.g. a blurred copy)."""
    n, c, h, w = x.shape
    per = math.ceil(h * w / steps)
    counts = torch.as_tensor([min(j * per, h * w) for j in range(steps + 1)], device=orders.device)
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(h * w, device=orders.device).expand(n, -1))  # pixel -> its place
    out = np.zeros((n, len(counts)))
    per_image = len(counts)
    rows = max(1, batch_size // per_image)  # images per forward: every step of each
    with torch.no_grad():
        for s in range(0, n, rows):
            keep = (rank[s:s + rows, None, :] >= counts[None, :, None]).view(-1, per_image, 1, h, w)
            fill = (baseline[s:s + rows, None] if torch.is_tensor(baseline)
                    else torch.full((), baseline, dtype=x.dtype, device=x.device))
            xb = torch.where(keep, x[s:s + rows, None], fill)
            p = prob_fn(xb.reshape(-1, c, h, w))
            p = p.view(-1, per_image, p.shape[-1])
            cls = classes[s:s + rows].to(p.device).view(-1, 1, 1).expand(-1, per_image, 1)
            out[s:s + rows] = p.gather(2, cls).squeeze(2).double().cpu().numpy()
    return out


def deletion_auc(curves: np.ndarray) -> np.ndarray:
    """``(N,)``: area under each deletion curve over the removed fraction ``[0, 1]`` (trapezoidal rule)."""
    curves = np.asarray(curves, dtype=np.float64)
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * (curves.shape[1] - 1))


def paired_comparison(a: np.ndarray, b: np.ndarray, seed: int = 0, n_resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """``a - b`` paired per item: mean and median, seeded bootstrap 95% interval of the mean, the share of items
    with ``a < b``, and the two-sided Wilcoxon signed-rank p-value (``None`` when all differences are 0)."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out: dict[str, Any] = {"n": int(len(d)), "mean_difference": None, "median_difference": None, "ci": None,
                           "share_lower": None, "wilcoxon_p": None}
    if not len(d):
        return out
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(1)
    out.update(mean_difference=float(d.mean()), median_difference=float(np.median(d)),
               ci=[float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
               share_lower=float((d < 0).mean()))
    if np.any(d != 0):
        out["wilcoxon_p"] = float(wilcoxon(d).pvalue)
    return out


def verdict(cmp: dict[str, Any], lower_name: str, upper_name: str) -> str:
    """In words, from a :func:`paired_comparison` of ``lower_name - upper_name`` deletion AUCs (lower = better)."""
    if cmp["ci"] is None:
        return "not measured (no images)"
    lo, hi = cmp["ci"]
    if hi < 0:
        return f"{lower_name} better (lower deletion AUC; the 95% interval of the difference lies below 0)"
    if lo > 0:
        return f"{upper_name} better (lower deletion AUC; the 95% interval of the difference lies above 0)"
    return "no significant difference (the 95% interval of the difference contains 0)"


def blurred(x: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """A Gaussian-blurred copy of ``x`` ``(N, C, H, W)`` (kernel ``2 * ceil(2 * sigma) + 1`` pixels, at most
    the image's odd size), the second deletion baseline."""
    from torchvision.transforms.functional import gaussian_blur

    k = min(2 * math.ceil(2 * sigma) + 1, (min(x.shape[2:]) - 1) // 2 * 2 + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma]) if k > 1 else x.clone()


def _scores(curves: dict[str, np.ndarray], n: int, seed: int) -> dict[str, Any]:
    auc = {o: deletion_auc(c) for o, c in curves.items()}
    sub_vs_full = paired_comparison(auc["subnetwork"], auc["full"], seed)
    return {
        "mean_curve": {o: c.mean(0).tolist() if n else [] for o, c in curves.items()},
        "mean_auc": {o: float(a.mean()) if n else None for o, a in auc.items()},
        "auc": {o: [round(float(v), 5) for v in a] for o, a in auc.items()},
        "subnetwork_minus_full": sub_vs_full,
        "full_minus_random": paired_comparison(auc["full"], auc["random"], seed),
        "subnetwork_minus_random": paired_comparison(auc["subnetwork"], auc["random"], seed),
        "verdict": verdict(sub_vs_full, "subnetwork", "full model"),
    }


def subnetwork_explanations(paths: Any, images: torch.Tensor, labels: torch.Tensor, positions: np.ndarray, *,
                            steps: int = DELETION_STEPS, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """The protocol of the module docstring on ``images`` (float ``(N, C, H, W)`` in ``[0, 1]``, correctly
    classified as ``labels``; ``positions`` their places in the audited split). Returns mean curves, AUCs
    per image and order, the paired comparisons and the verdict for the black baseline (at the top level)
    and the same for the blurred one (``blurred_baseline``), JSON-ready."""
    t0 = time.perf_counter()
    clf = paths.classifier
    dev = next((p.device for p in clf.parameters()), torch.device("cpu"))
    n = len(labels)
    gen = torch.Generator().manual_seed(seed)
    curves: dict[str, dict[str, list[np.ndarray]]] = {b: {o: [] for o in ORDERS} for b in ("zero", "blur")}
    prob = lambda xb: clf(xb.to(dev)).softmax(1)  # noqa: E731
    for s in range(0, n, batch_size):
        x, y = images[s:s + batch_size].to(dev), labels[s:s + batch_size].to(dev)
        sal = {"subnetwork": gradient_saliency(lambda v: paths.subnetwork_logits(v, y), x, y),
               "full": gradient_saliency(clf, x, y)}
        h, w = x.shape[2:]
        orders = {o: deletion_orders(sal[o]) for o in sal}
        orders["random"] = torch.stack([torch.randperm(h * w, generator=gen) for _ in range(len(y))]).to(dev)
        for b, base in (("zero", 0.0), ("blur", blurred(x))):
            for o in ORDERS:
                curves[b][o].append(deletion_curves(prob, x, y, orders[o], steps, base, batch_size=256))
    done = {b: {o: (np.concatenate(c) if c else np.zeros((0, steps + 1))) for o, c in cs.items()}
            for b, cs in curves.items()}
    hw = images.shape[2] * images.shape[3]
    return {
        "n_images": int(n), "steps": int(steps), "baseline": "zero", "seed": int(seed),
        "positions": [int(p) for p in positions],
        "fractions": [min(j * math.ceil(hw / steps), hw) / hw for j in range(steps + 1)],
        **_scores(done["zero"], n, seed),
        "blurred_baseline": {"sigma": BLUR_SIGMA, **_scores(done["blur"], n, seed)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
