"""Measures a fitted NND architecture encoder (``nad-guard fit-encoder``) against the original classifier.

    python bench/encoder_bench.py --artifact bench/results/guard_cifar10-resnet20 \
        --encoder bench/results/encoder_cifar10-resnet20 --data cifar10 --images 2000 --out results.json

On ``--images`` seeded test images (the same sample ``fit-encoder`` measures on, by default): accuracy of the
original, of the decoupled network (hard gates, masked) and, where the network allows it
(:func:`nad_guard.encoder.check_skippable`), of the decoupled network with closed channels skipped; FLOPs
per image (``FlopCounterMode``: convolutions and matrix products, the control modules included); CPU wall
time per image at batch 1 and 64 (median of ``--repeats``, one torch thread); the cost of the encoder's
detection features against a plain forward; and, as a first look at use 1, the AUROC of each encoder
feature for the classifier's mispredictions on these images (higher score = more suspicious, sign chosen
by the feature's meaning: similarity features are negated). The machine's facts come from
``nad_guard.runinfo``.
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
from nad_guard.encoder import ArchitectureEncoder, check_skippable, count_flops, encoder_features, skip_forward, wall_seconds
from nad_guard.guard import artifact_classifier, resolve_guard_dir
from nad_guard.hooks import hooked, pool
from nad_guard.metrics import auroc
from nad_guard.paths import PathModel, apply_gate
from nad_guard.runinfo import machine_info, portable_command
from training.distributed import permutation


def magnitude_oracle(clf, names: list[str], x: torch.Tensor, y: torch.Tensor, shares=(0.1, 0.2, 0.3)) -> dict:
    """Accuracy when each image closes the share ``q`` of channels with the smallest pooled output at each of
    ``names`` (the layer's own output: an oracle that sees what it closes, which no encoder can before the
    layer runs). For the inner channels (``*.bn1``) the pooled ReLU of the batch-norm output is ranked."""
    out = {}
    for q in shares:
        def close(i: int, o: torch.Tensor) -> torch.Tensor:
            p = pool(torch.relu(o))
            return apply_gate(o, (p > p.quantile(q, dim=1, keepdim=True)).to(o.dtype))
        with torch.no_grad(), hooked(clf.net, names, close):
            pred = torch.cat([clf(b) for b in x.split(256)]).argmax(1)
        out[str(q)] = float((pred == y).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--flop-images", type=int, default=200, help="images whose skipped FLOPs are counted one by one")
    ap.add_argument("--timing-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = resolve_guard_dir(a.artifact)
    clf = artifact_classifier(path)
    enc = ArchitectureEncoder.load(a.encoder, clf)
    path_model = PathModel.load(path, clf)
    paths = path_model if path_model.layer_names_ == enc.names else None  # other gate points: no mask columns
    _, test = load_dataset(a.data)
    test = test.subset(permutation(len(test), a.seed, -1)[:a.images])
    x, y = test.float(), test.labels
    res: dict = {"command": portable_command(sys.argv, "python bench/encoder_bench.py"), "machine": machine_info(),
                 "images": len(x), "encoder_training": enc.training_meta, "fit": {
                     k: enc.metrics_meta.get(k) for k in ("train_seconds", "test")}}
    with torch.no_grad():
        orig = torch.cat([clf(b) for b in x.split(256)]).argmax(1)
        hard = enc.encode(x, "hard")[0].argmax(1)
        gates = enc.encode(x, "hard")[1]
    acc = {"original": float((orig == y).float().mean()), "decoupled_masked": float((hard == y).float().mean()),
           "fidelity_masked": float((hard == orig).float().mean())}
    res["kept_fraction"] = dict(zip(enc.names, [round(float(g.mean()), 4) for g in enc.split(gates)]))
    res["kept_fraction_mean"] = float(gates.mean())
    flops_orig = count_flops(lambda: clf(x[:1]))
    res["flops_per_image"] = {"original": flops_orig}
    try:
        check_skippable(enc)
        skippable = True
    except ValueError as e:
        skippable, res["skipping"] = False, f"not run: {e}"
    if skippable:
        with torch.no_grad():
            skipped = skip_forward(enc, x, "image").argmax(1)
        acc["decoupled_skipped"] = float((skipped == y).float().mean())
        acc["skipped_equals_masked"] = float((skipped == hard).float().mean())
        per = [count_flops(lambda xi=xi: skip_forward(enc, xi[None])) for xi in x[:a.flop_images]]
        union = count_flops(lambda: skip_forward(enc, x[:64], "union")) / 64
        res["flops_per_image"] |= {"skipped_per_image_mean": statistics.mean(per), "skipped_per_image_min": min(per),
                                   "skipped_per_image_max": max(per), "skipped_union_batch64": union,
                                   "ratio_per_image": flops_orig / statistics.mean(per),
                                   "ratio_union_batch64": flops_orig / union}
        xt = x[:a.timing_images]
        with torch.no_grad():
            t = {}
            t["original_b1"] = statistics.mean(wall_seconds(lambda xi=xi: clf(xi[None]), a.repeats) for xi in xt[:16])
            t["skipped_b1"] = statistics.mean(wall_seconds(lambda xi=xi: skip_forward(enc, xi[None]), a.repeats)
                                              for xi in xt[:16])
            t["masked_b1"] = statistics.mean(wall_seconds(lambda xi=xi: enc(xi[None], "hard"), a.repeats)
                                             for xi in xt[:16])
            t["original_b64"] = wall_seconds(lambda: clf(xt), a.repeats) / len(xt)
            t["skipped_union_b64"] = wall_seconds(lambda: skip_forward(enc, xt, "union"), a.repeats) / len(xt)
            t["skipped_image_loop_b64"] = wall_seconds(lambda: skip_forward(enc, xt, "image"), a.repeats) / len(xt)
            t["masked_b64"] = wall_seconds(lambda: enc(xt, "hard"), a.repeats) / len(xt)
        res["wall_seconds_per_image"] = t
        res["wall_ratio"] = {"b1": t["original_b1"] / t["skipped_b1"],
                             "b64_union": t["original_b64"] / t["skipped_union_b64"],
                             "b64_image_loop": t["original_b64"] / t["skipped_image_loop_b64"]}
    res["accuracy"] = acc
    if skippable:
        blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(len(getattr(clf.net, f"layer{i}")))]
        inner = [f"{n}.bn1" for n in blocks]
        res["magnitude_oracle_accuracy"] = {"closed_share_at_gate_points": magnitude_oracle(clf, ["relu"] + blocks, x, y),
                                            "closed_share_at_inner_channels": magnitude_oracle(clf, inner, x, y)}
    # use 1: cost and a first look at mispredictions
    xs = x[:256]
    with torch.no_grad():
        plain = wall_seconds(lambda: clf(xs), a.repeats)
        feats = wall_seconds(lambda: encoder_features(enc, paths, xs), a.repeats)
        path_f = wall_seconds(lambda: path_model.features(xs), a.repeats)
    res["feature_cost_256_images_seconds"] = {"plain_forward": plain, "encoder_features": feats,
                                              "path_features": path_f, "encoder_over_plain": feats / plain}
    t0 = time.time()
    X, names = encoder_features(enc, paths, x)
    wrong = (orig != y).numpy().astype(int)
    sign = {n: (-1.0 if n.startswith(("enc_cos", "enc_mean_margin", "enc_nearest", "enc_fidelity")) else 1.0)
            for n in names}
    res["misprediction_auroc"] = {n: round(auroc(wrong, sign[n] * X[:, i].numpy()), 4) for i, n in enumerate(names)
                                  if "/" not in n}
    res["misprediction_auroc"]["msp_baseline"] = round(auroc(wrong, -torch.cat(
        [clf(b).softmax(1).amax(1) for b in x.split(256)]).detach().numpy()), 4)
    res["features_seconds_all_images"] = round(time.time() - t0, 2)
    res["mispredictions"] = int(wrong.sum())
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("accuracy", "kept_fraction_mean", "flops_per_image", "magnitude_oracle_accuracy") if k in res}, indent=1))
    print(json.dumps({k: res.get(k) for k in ("wall_ratio", "feature_cost_256_images_seconds", "misprediction_auroc")},
                     indent=1))


if __name__ == "__main__":
    main()
