"""Step 4 of the deep-check experiment: what the deep check costs against a plain forward pass of the
reference CIFAR-10 ResNet-20 on CPU (one torch thread), at batch 1 and 64, median seconds per batch.

    python bench/experiments/2026-12-02-deep-check-cifar10/cost.py \
        bench/experiments/2026-12-02-deep-check-cifar10/cost.json

Timed: ``classifier(x)`` (plain forward), ``PathModel.features`` (the single-pass guard's features) and
``probe_features`` (the deep check: the input and its k probes in one pass, the input's own features
included) for k = 4, 8, 16 with the chosen design's transforms: the whole batch in one pass of (k + 1) * B
rows, and (batch 64) in passes of at most 256 rows. Target (issue 21): deep <= (k + 1.2) x plain."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nad_guard.data import load_dataset
from nad_guard.guard import artifact_classifier
from nad_guard.paths import PathModel
from nad_guard.probes import ProbeSpec, probe_features, rows_per_pass
from nad_guard.runinfo import load_snapshot, machine_info

ARTIFACT = "bench/results/guard_cifar10-resnet20"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(out: Path, spec: ProbeSpec) -> None:
    torch.set_num_threads(1)
    train, test = load_dataset("cifar10")
    clf = artifact_classifier(ARTIFACT, "cifar10-resnet20", class_names=train.classes, input_size=train.shape[1],
                              channels=train.shape[0])
    paths = PathModel.load(ARTIFACT, clf)
    start = machine_info()
    rows = []
    for batch, repeats in ((1, 21), (64, 5)):
        x = test.float(0, batch)
        with torch.no_grad():
            plain = median_seconds(lambda: clf(x), repeats)
        single = median_seconds(lambda: paths.features(x, batch_size=batch), repeats)
        row = {"batch": batch, "plain_forward_s": plain, "single_pass_features_s": single,
               "single_pass_x": single / plain}
        for k in (4, 8, 16):
            s = ProbeSpec(**{**spec.to_dict(), "k": k})
            deep = median_seconds(lambda: probe_features(paths, x, s, batch_size=batch), max(3, repeats // 2))
            row |= {f"deep_k{k}_s": deep, f"deep_k{k}_x": deep / plain, f"deep_k{k}_target_x": k + 1.2}
            if batch > 1:  # the same in passes of at most 256 rows (rows_per_pass)
                chunk = rows_per_pass(s, 256)
                deep = median_seconds(lambda: probe_features(paths, x, s, batch_size=chunk), max(3, repeats // 2))
                row |= {f"deep_k{k}_passes256_s": deep, f"deep_k{k}_passes256_x": deep / plain}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"spec": spec.to_dict(), "rows": rows, "machine": {"start": start, "end": machine_info(),
                                                                                 "load": load_snapshot()}}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), ProbeSpec.from_dict(json.loads(sys.argv[2])) if len(sys.argv) > 2 else ProbeSpec())
