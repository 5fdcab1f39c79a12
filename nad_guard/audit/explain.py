"""Each misprediction's path, layer by layer, against the true and the predicted class's sub-architectures,
and the filters that decided it (issue 20, item 4).

Per misprediction (true class ``t``, predicted ``p``) and gate point ``l`` (:func:`explain_mispredictions`;
``layers`` holds one list per quantity, over the gate points in order; numbers rounded to 4 decimals):

``score_true``, ``score_pred``
    the per-layer class scores ``s_t``, ``s_p`` of :mod:`nad_guard.paths.features` (how much more the
    channels of the class's mask fire than the rest, in standard deviations).
``mass_true``, ``mass_pred``
    the share of the layer's pooled absolute activation inside ``M_t`` / ``M_p`` (``mass_share`` for each).
``nearest``
    the class with the highest score at the gate point.

The *divergence layer* is the first gate point from which ``s_p > s_t`` at every later gate point (the
path has left the true class's sub-architecture for the predicted one's and does not come back); ``None``
when ``s_p <= s_t`` at the last gate point. At that layer (the last gate point when ``None``) the
*deciding filters* are the ``top`` channels with the largest contribution to the logit margin
``logit_p - logit_t``, measured as gradient x activation summed over positions (the first-order Taylor
term of the margin in that channel's output; Grad-CAM's channel weight times the activation), each marked
in or out of ``M_t`` and ``M_p``. The knock-out check zeroes those channels' outputs at that layer in one
more forward pass: ``flips`` says whether the prediction leaves ``p``, ``to_true`` whether it becomes
``t``, ``margin_after`` the new ``logit_p - logit_t``; ``knockout_random`` does the same with as many channels
of that layer drawn at random (seeded), the reference. ``pred_mask_share`` / ``true_mask_share``: the
share of that layer's channels in ``M_p`` / ``M_t``, the chance rate of a deciding filter being in them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from nad_guard.hooks import hooked, pool
from nad_guard.paths.features import path_features
from nad_guard.paths.gate_points import apply_gate

TOP_CHANNELS = 5


def divergence_layer(score_true: np.ndarray, score_pred: np.ndarray) -> int | None:
    """First gate point from which ``score_pred > score_true`` holds to the last one; ``None`` if it does not
    hold at the last gate point."""
    ahead = np.asarray(score_pred) > np.asarray(score_true)
    if not ahead[-1]:
        return None
    behind = np.flatnonzero(~ahead)
    return int(behind[-1] + 1) if len(behind) else 0


def _r(v: Any) -> float:
    """A number rounded to 4 decimals: the rows are read, not recomputed from (and there may be thousands)."""
    return round(float(v), 4)


def _mass(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mag = a.abs().double()
    return (mag * mask.double()).sum(1) / mag.sum(1).clamp_min(1e-12)


def explain_batch(paths: Any, x: torch.Tensor, labels: torch.Tensor, top: int = TOP_CHANNELS,
                  generator: torch.Generator | None = None) -> list[dict[str, Any]]:
    """The records of the module docstring for a batch of mispredicted images ``x`` with true ``labels``;
    ``generator`` draws the random channels of the reference knock-out."""
    names = paths.layer_names_
    dev = x.device
    masks = [paths.masks_[n].to(dev) for n in names]
    stats = [paths.stats_[n].to(dev) for n in names]
    outs: list[torch.Tensor | None] = [None] * len(names)

    def keep(i: int, out: torch.Tensor) -> None:
        outs[i] = out

    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)  # so the gate points' outputs are in the graph
        with hooked(paths.classifier.net, names, keep):
            logits = paths.classifier(xg)
        pred = logits.argmax(1)
        y = labels.to(dev)
        margin = logits.gather(1, pred[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        grads = torch.autograd.grad(margin.sum(), outs)  # type: ignore[arg-type]
    with torch.no_grad():
        pooled = [pool(o.detach()) for o in outs]  # type: ignore[union-attr]
        parts = path_features(pooled, logits.detach(), masks, stats)
        s = parts["class_scores"].double()  # (N, L, K)
        contrib = [(o.detach() * g).flatten(2).sum(2) if o.ndim > 2 else o.detach() * g  # type: ignore[union-attr]
                   for o, g in zip(outs, grads)]
    records, knock = [], []
    for i in range(len(x)):
        t, p = int(y[i]), int(pred[i])
        st, sp = s[i, :, t].cpu().numpy(), s[i, :, p].cpu().numpy()
        dl = divergence_layer(st, sp)
        at = len(names) - 1 if dl is None else dl
        c = contrib[at][i].double().cpu()
        order = torch.argsort(-c, stable=True)[:top]
        mt, mp = masks[at][t].cpu(), masks[at][p].cpu()
        positive = float(c.clamp_min(0).sum())
        records.append({
            "true": t, "pred": p, "logit_margin": _r(margin[i].detach()),
            "layers": {"score_true": [_r(v) for v in st], "score_pred": [_r(v) for v in sp],
                       "mass_true": [_r(_mass(pooled[l][i:i + 1], masks[l][t][None])[0]) for l in range(len(names))],
                       "mass_pred": [_r(_mass(pooled[l][i:i + 1], masks[l][p][None])[0]) for l in range(len(names))],
                       "nearest": [int(parts["nearest_class"][i, l]) for l in range(len(names))]},
            "divergence_layer": None if dl is None else names[dl], "decided_at": names[at],
            "channels": [{"channel": int(ch), "contribution": _r(c[ch]), "in_true": bool(mt[ch]),
                          "in_pred": bool(mp[ch])} for ch in order],
            "channels_total": _r(c.sum()), "true_mask_share": _r(mt.float().mean()),
            "pred_mask_share": _r(mp.float().mean()),
            "top_share_of_positive": _r(c[order].clamp_min(0).sum() / positive) if positive > 0 else None,
        })
        knock.append((at, order))
    # knock-out: zero each row's deciding channels at its layer (and, for reference, as many random channels
    # of that layer), one forward each for the batch
    for key, pick in (("knockout", lambda at, order: order),
                      ("knockout_random", lambda at, order: torch.randperm(masks[at].shape[1], generator=generator)[
                          :len(order)])):
        gates = [torch.ones(len(x), m.shape[1], device=dev) for m in masks]
        for i, (at, order) in enumerate(knock):
            gates[at][i, pick(at, order).to(dev)] = 0.0
        with torch.no_grad(), hooked(paths.classifier.net, names, lambda i, out: apply_gate(out, gates[i])):
            after = paths.classifier(x)
        for i, r in enumerate(records):
            new = int(after[i].argmax())
            r[key] = {"pred_after": new, "flips": new != r["pred"], "to_true": new == r["true"],
                      "margin_after": _r(after[i, r["pred"]] - after[i, r["true"]])}
    return records


def explain_mispredictions(paths: Any, images: torch.Tensor, labels: torch.Tensor, positions: np.ndarray,
                           top: int = TOP_CHANNELS, batch_size: int = 128, seed: int = 0) -> dict[str, Any]:
    """:func:`explain_batch` over every misprediction (``images`` float in ``[0, 1]``, their true ``labels``
    and ``positions`` in the audited split), with the aggregate: where the paths diverge and how often the
    knock-out flips the prediction."""
    t0 = time.perf_counter()
    dev = next((p.device for p in paths.classifier.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for s in range(0, len(labels), batch_size):
        rows += explain_batch(paths, images[s:s + batch_size].to(dev), labels[s:s + batch_size], top, gen)
    for r, pos in zip(rows, positions):
        r["index"] = int(pos)
    names = paths.layer_names_
    n = len(rows)
    where = {name: sum(r["divergence_layer"] == name for r in rows) for name in names}
    in_pred = [ch["in_pred"] for r in rows for ch in r["channels"]]
    in_true = [ch["in_true"] for r in rows for ch in r["channels"]]
    return {
        "n": n, "top": top,
        "divergence_layer_counts": where, "never_diverged": sum(r["divergence_layer"] is None for r in rows),
        "knockout_flips": sum(r["knockout"]["flips"] for r in rows),
        "knockout_to_true": sum(r["knockout"]["to_true"] for r in rows),
        "random_knockout_flips": sum(r["knockout_random"]["flips"] for r in rows),
        "random_knockout_to_true": sum(r["knockout_random"]["to_true"] for r in rows),
        "deciding_in_pred_mask": float(np.mean(in_pred)) if in_pred else None,
        "deciding_in_true_mask": float(np.mean(in_true)) if in_true else None,
        "pred_mask_share": float(np.mean([r["pred_mask_share"] for r in rows])) if rows else None,
        "true_mask_share": float(np.mean([r["true_mask_share"] for r in rows])) if rows else None,
        "rows": rows, "seconds": round(time.perf_counter() - t0, 2),
    }
