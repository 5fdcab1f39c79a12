"""Measures a fine-tuned top-k gated copy of a CIFAR ResNet (``python -m training.boost``) against the original.

    python bench/boost_bench.py --artifact bench/results/guard_cifar10-resnet20 \
        --boosted bench/results/encoder_cifar10-resnet20/topk --data cifar10 --images 2000 --out results.json

The same measures as ``bench/encoder_bench.py``, on the same seeded test images: accuracy of the original, of
the gated copy (masked forward) and of the copy with its closed channels skipped
(:func:`nad_guard.encoder.skip_forward_topk`), and its agreement with the original; FLOPs per image
(``FlopCounterMode``: convolutions and matrix products, the saliency predictors included); CPU wall time per
image at batch 1 (mean over 16 images of the median of ``--repeats``) and at batch 64 (median of
``--repeats``), one torch thread; then the same variants again in ``--rounds`` interleaved rounds, whose
per-round ratios are less exposed to a shared machine's changing load. Skipping at batch 64 runs either one grouped pass (``grouped``) or a loop of
single images (``image``). As a reference for dense speed, the copy is also run with *static* channels (each
block's ``k`` channels most often open on ``--static-images`` training images, weights pre-sliced, no
predictors, no further fine-tuning). The machine's facts come from ``nad_guard.runinfo``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nad_guard.data import load_dataset
from nad_guard.encoder import BoostedResNet, count_flops, skip_forward_topk, wall_seconds
from nad_guard.guard import artifact_classifier, resolve_guard_dir
from nad_guard.runinfo import machine_info, portable_command
from training.distributed import permutation


@torch.no_grad()
def interleaved(clf, model: BoostedResNet, static, xt: torch.Tensor, rounds: int) -> dict:
    """Wall time per image of every variant, run in turn within each of ``rounds`` rounds (median of 3 calls
    after one warm-up; batch 1: the first 8 images), so that load changes hit all variants alike; the
    median over rounds of each round's ratio original / variant."""
    z = clf.normalize(xt)
    b1 = {"original": lambda xi, zi: clf(xi), "skipped": lambda xi, zi: skip_forward_topk(model, xi),
          "static": lambda xi, zi: static(zi)}
    b64 = {"original": lambda: clf(xt), "skipped_grouped": lambda: skip_forward_topk(model, xt, "grouped"),
           "static": lambda: static(z)}
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn in b1.items():
            times.setdefault(f"{name}_b1", []).append(statistics.mean(
                wall_seconds(lambda i=i: fn(xt[i:i + 1], z[i:i + 1]), 3) for i in range(8)))
        for name, fn in b64.items():
            times.setdefault(f"{name}_b64", []).append(wall_seconds(fn, 3) / len(xt))
    ratio = {k: statistics.median(o / v for o, v in zip(times[f"original_{k.rsplit('_', 1)[1]}"], times[k]))
             for k in times if not k.startswith("original")}
    return {"rounds": rounds, "median_seconds_per_image": {k: statistics.median(v) for k, v in times.items()},
            "median_ratio_original_over_variant": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--boosted", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--flop-images", type=int, default=200)
    ap.add_argument("--timing-images", type=int, default=64)
    ap.add_argument("--static-images", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=15,
                    help="interleaved rounds of the wall-time check (every variant once per round, ratios per round)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    clf = artifact_classifier(resolve_guard_dir(a.artifact))
    model = BoostedResNet.load(a.boosted, clf)
    fast = model.as_classifier()
    train, test = load_dataset(a.data)
    test = test.subset(permutation(len(test), a.seed, -1)[:a.images])
    x, y = test.float(), test.labels
    res: dict = {"command": portable_command(sys.argv, "python bench/boost_bench.py"), "machine": machine_info(),
                 "images": len(x), "training": model.training_meta, "fit": model.metrics_meta, "k": model.k}
    with torch.no_grad():
        orig = torch.cat([clf(b) for b in x.split(256)]).argmax(1)
        masked = torch.cat([fast(b) for b in x.split(256)]).argmax(1)
        skipped = skip_forward_topk(model, x, "image").argmax(1)
    sample = train.subset(permutation(len(train), a.seed, -4)[:a.static_images])
    counts = model.selection_counts(clf.normalize(sample.float()))
    channels = [c.topk(k).indices.sort().values for c, k in zip(counts, model.k)]
    static = model.static_net(channels)
    with torch.no_grad():
        stat = torch.cat([static(clf.normalize(b)) for b in x.split(256)]).argmax(1)
    share = [float(c.topk(k).values.sum() / c.sum()) for c, k in zip(counts, model.k)]
    res["gates"] = {"open_share_in_static_channels_per_block": [round(s, 4) for s in share],
                    "open_share_in_static_channels_mean": statistics.mean(share)}
    res["accuracy"] = {"original": float((orig == y).float().mean()), "topk_masked": float((masked == y).float().mean()),
                       "topk_skipped": float((skipped == y).float().mean()),
                       "skipped_equals_masked": float((skipped == masked).float().mean()),
                       "fidelity_to_original": float((skipped == orig).float().mean()),
                       "static_channels": float((stat == y).float().mean())}
    flops_orig = count_flops(lambda: clf(x[:1]))
    per = [count_flops(lambda xi=xi: skip_forward_topk(model, xi[None])) for xi in x[:a.flop_images]]
    grouped = count_flops(lambda: skip_forward_topk(model, x[:64], "grouped")) / 64
    flops_static = count_flops(lambda: static(clf.normalize(x[:1])))
    res["flops_per_image"] = {"original": flops_orig, "skipped_per_image_mean": statistics.mean(per),
                              "skipped_per_image_min": min(per), "skipped_per_image_max": max(per),
                              "skipped_grouped_batch64": grouped, "masked": count_flops(lambda: fast(x[:1])),
                              "static": flops_static, "ratio_skipped": flops_orig / statistics.mean(per),
                              "ratio_static": flops_orig / flops_static}
    xt = x[:a.timing_images]
    t = {}
    with torch.no_grad():
        zt = clf.normalize(xt)
        t["original_b1"] = statistics.mean(wall_seconds(lambda xi=xi: clf(xi[None]), a.repeats) for xi in xt[:16])
        t["skipped_b1"] = statistics.mean(wall_seconds(lambda xi=xi: skip_forward_topk(model, xi[None]), a.repeats)
                                          for xi in xt[:16])
        t["static_b1"] = statistics.mean(wall_seconds(lambda zi=zi: static(zi[None]), a.repeats) for zi in zt[:16])
        t["masked_b1"] = statistics.mean(wall_seconds(lambda xi=xi: fast(xi[None]), a.repeats) for xi in xt[:16])
        t["original_b64"] = wall_seconds(lambda: clf(xt), a.repeats) / len(xt)
        t["skipped_grouped_b64"] = wall_seconds(lambda: skip_forward_topk(model, xt, "grouped"), a.repeats) / len(xt)
        t["skipped_image_loop_b64"] = wall_seconds(lambda: skip_forward_topk(model, xt, "image"), a.repeats) / len(xt)
        t["static_b64"] = wall_seconds(lambda: static(zt), a.repeats) / len(xt)
        t["masked_b64"] = wall_seconds(lambda: fast(xt), a.repeats) / len(xt)
        t["original_b64_again"] = wall_seconds(lambda: clf(xt), a.repeats) / len(xt)
    res["wall_seconds_per_image"] = t
    res["wall_ratio"] = {"b1": t["original_b1"] / t["skipped_b1"],
                         "b64_grouped": t["original_b64"] / t["skipped_grouped_b64"],
                         "b64_image_loop": t["original_b64"] / t["skipped_image_loop_b64"],
                         "static_b1": t["original_b1"] / t["static_b1"], "static_b64": t["original_b64"] / t["static_b64"]}
    res["wall_interleaved"] = interleaved(clf, model, static, xt, a.rounds)
    res["bench_seconds"] = round(time.time() - t_start, 1)
    res["machine_after"] = machine_info()
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("accuracy", "flops_per_image", "wall_seconds_per_image", "wall_ratio",
                                          "gates", "wall_interleaved")}, indent=1))


if __name__ == "__main__":
    main()
