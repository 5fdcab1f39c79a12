"""Which class paths track the classifier's confusions? NAD's k-most-similar test (k = 1, 3) and the Spearman
correlation of pair similarity against confusion rate, as the audit measures them
(nad_guard.audit.class_paths), for four class-path sources at the same gate points:

- ``masks``: the guard's binary NAD masks (the audit's first source);
- ``nnd-encoder``: the encoder's mean soft gates over the correctly classified test images of each class
  (the audit's second source, ``nad-guard audit --encoder``);
- ``nnd-encoder (training means)``: the encoder file's own ``class_means`` (its training images, grouped by the
  classifier's prediction): the same without any test image;
- ``activations``: no encoder at all, each class's mean pooled positive output ``pool(relu(out))`` of the
  gate points over the same correctly classified test images (the weighted Jaccard index is unchanged by a
  common scale, so the raw means are used, divided by each layer's largest value only to lie in [0, 1]):
  what the encoder's gates are aligned to in training, the baseline that says whether the encoder adds anything.

    OMP_NUM_THREADS=1 python bench/class_path_baselines.py --artifact bench/results/guard_cifar10-resnet20 \\
        --encoder bench/results/encoder_cifar10-resnet20 --data cifar10 --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    from nad_guard.audit import (ClassPaths, class_paths_from_encoder, class_paths_from_masks, confusion_matrix,
                                 k_similar_test, load_split)
    from nad_guard.audit.stats import pair_rates
    from nad_guard.encoder import ArchitectureEncoder
    from nad_guard.guard import Guard, resolve_guard_dir
    from nad_guard.hooks import hooked, pool
    from nad_guard.runinfo import machine_info, portable_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    guard = Guard.load(resolve_guard_dir(args.artifact), device="cpu")
    enc = ArchitectureEncoder.load(args.encoder, guard.classifier)
    data = load_split(args.data, "test", None, guard)
    layers, k = guard.paths.layer_names_, guard.classifier.num_classes
    if enc.names != layers:
        raise SystemExit(f"the encoder's gate points {enc.names} are not the guard's {layers}")
    preds, acts = [], {n: [] for n in layers}

    def keep(i: int, out: torch.Tensor) -> None:
        acts[layers[i]].append(pool(torch.relu(out.float())))

    with torch.no_grad(), hooked(guard.classifier.net, layers, keep):
        for s in range(0, len(data), args.batch_size):
            preds.append(guard.classifier(data.float(s, s + args.batch_size)).argmax(1))
    pred = torch.cat(preds).numpy()
    label = data.labels.numpy()
    ok = pred == label
    print(f"{len(data)} images, {int((~ok).sum())} mispredictions ({time.perf_counter() - t0:.0f} s)", flush=True)
    counts = np.bincount(label[ok], minlength=k)
    act_vectors = []
    for n in layers:
        a = torch.cat(acts[n]).double().numpy()[ok]
        means = np.stack([a[label[ok] == c].mean(0) for c in range(k)])
        act_vectors.append(means / means.max())
    sources = [class_paths_from_masks(guard.paths)]
    t1 = time.perf_counter()
    sources.append(class_paths_from_encoder(enc, data.images[torch.as_tensor(np.flatnonzero(ok))], label[ok],
                                            layers, args.batch_size))
    print(f"encoder class paths in {time.perf_counter() - t1:.0f} s", flush=True)
    sources.append(ClassPaths("nnd-encoder (training means)", "the encoder file's class_means: mean soft gates of its "
                              "training images by the classifier's prediction", list(enc.names),
                              [v.double().numpy() for v in enc.split(enc.class_means)]))
    sources.append(ClassPaths("activations", "mean pooled output of the gate points over the correctly classified "
                              "test images of each class, over each layer's largest value", list(layers),
                              act_vectors, counts.tolist()))
    iu = np.triu_indices(k, 1)
    rate = pair_rates(confusion_matrix(label, pred, k))[iu]
    from scipy.stats import spearmanr

    out = {}
    for src in sources:
        sim = src.similarity()
        r = spearmanr(sim[iu], rate)
        t = k_similar_test(sim, label, pred, list(guard.classifier.class_names))
        order = np.argsort(-sim[iu], kind="stable")
        rank = {(int(iu[0][i]), int(iu[1][i])): j + 1 for j, i in enumerate(order)}
        worst = int(np.argmax(rate))
        out[src.name] = {"description": src.description, "spearman_rho": float(r.statistic),
                         "spearman_p": float(r.pvalue),
                         "nad_test": {kk: {key: v[key] for key in ("hits", "n", "share", "ci", "chance", "p_value")}
                                      for kk, v in t["by_k"].items()},
                         "most_confused_pair_similarity_rank": rank[(int(iu[0][worst]), int(iu[1][worst]))]}
        print(f"{src.name}: rho {r.statistic:.3f} (p {r.pvalue:.2g}), k=1 {t['by_k']['1']['share']:.3f}, "
              f"k=3 {t['by_k']['3']['share']:.3f}", flush=True)
    names = guard.classifier.class_names
    result = {"command": f"python bench/class_path_baselines.py --artifact {portable_path(args.artifact)} --encoder "
                         f"{portable_path(args.encoder)} --data {args.data}",
              "images": len(data), "mispredictions": int((~ok).sum()), "correct_per_class": counts.tolist(),
              "most_confused_pair": [names[iu[0][int(np.argmax(rate))]], names[iu[1][int(np.argmax(rate))]]],
              "sources": out, "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info()}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
