"""Cost of the guard's deep mode (nad_guard.deep) against a plain forward pass of the classifier.

    .venv/bin/python bench/deep_cost.py          # writes bench/results/deep_cost.{md,json}

For each guard (the committed CIFAR-10 ResNet-20 guard, bench/results/guard_cifar10-resnet20, and the
bundled MNIST guard), median wall time per image, at batch 1 and at batch 64, of:

* ``plain``: the classifier's forward pass alone (no hooks, no padding);
* ``single``: ``Guard.run`` (single pass: padded to a multiple of 8 rows, path features, detector), in passes
  of at most 128 rows (the service's ``NAD_GUARD_FORWARD_ROWS``);
* ``deep k``: ``Guard.run(deep=True)`` with k = 4 and 8 probes (passes of ``(k + 1)`` rows an input, as many
  inputs a pass as fit in 128 rows, rounded down to a multiple of 8: 8 inputs; the padding to 8 inputs applies
  too, so a single image costs ``8 (k + 1)`` rows);
* at batch 1 also ``deep k, pad 1``: the same without padding (``pad_multiple=1``), what one image costs
  when a row's result may depend on its batch.

The ratio deep/plain is compared with the target of issue 21, at most ``(k + 1.2)``x. Runs in ``--rounds``
interleaved rounds, one torch thread (the machine's cores are shared: its load average is recorded).

The deep detectors timed here are fitted in this script, for timing only (their cost is a logistic
regression's dot product either way; what they detect is the evaluation's business): the guard's own
method and encoding, ``ProbeSpec(k=k)``, on 128 clean test images and their FGSM adversarials
(``nad_guard.attacks.generate``, the guard's suite), calibrated on 128 other clean test images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nad_guard.runinfo import median_seconds
from nad_guard.attacks import generate  # noqa: E402
from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.deep import fit_deep_detector  # noqa: E402
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard  # noqa: E402
from nad_guard.probes import ProbeSpec  # noqa: E402
from nad_guard.runinfo import load_average, machine_info, portable_command  # noqa: E402

ROWS = 128  # rows per forward pass, the service's default (NAD_GUARD_FORWARD_ROWS): deep passes of 8 inputs
# (k = 8: 72 rows). One pass of 576 rows (64 inputs, k = 8) took 2.6x as long as 8 passes of 72 on this machine.
GUARDS = {"cifar10-resnet20": (ROOT / "bench/results/guard_cifar10-resnet20", "cifar10", "cifar10"),
          "mnist-cnn (bundled)": (DEFAULT_GUARD_DIR, "mnist5k", "mnist")}


def with_deep(guard: Guard, test, suite: str, k: int, n: int = 128) -> Guard:
    """A copy of ``guard`` with a deep detector of ``k`` probes fitted for timing (see the docstring)."""
    clean = test.float(0, n)
    adv = generate(guard.classifier, clean, test.labels[:n], attack="fgsm", suite=suite, progress=False).adv_images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small calibration set: fine for timing
        det, _ = fit_deep_detector(guard.paths, [clean, adv], [np.zeros(len(clean)), np.ones(len(adv))],
                                   test.float(n, 2 * n), method=guard.detector.method, encoding=guard.encoding,
                                   spec=ProbeSpec(k=k), fpr=guard.detector.fpr_, progress=False)
    return Guard(guard.paths, guard.detector, guard.encoding, guard.meta, guard.error_detector, guard.attack_share,
                 deep_detector=det, probes=ProbeSpec(k=k))


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    return median_seconds(fn, repeats, warmup=1)


def measure(name: str, guard_dir: Path, data: str, suite: str, ks: list[int], rounds: int) -> list[dict]:
    guard = Guard.load(guard_dir)
    test = load_dataset(data)[1]
    deep = {k: with_deep(guard, test, suite, k) for k in ks}
    clf = guard.classifier
    rows = []
    for batch in (1, 64):
        x = test.float(300, 300 + batch)  # not the images the timing detectors saw (0-255)
        repeats = 20 if batch == 1 else 3

        def plain() -> None:
            with torch.no_grad():
                clf(x)

        configs = {"plain": plain, "single": lambda: guard.run(x, batch_size=ROWS)}
        for k in ks:
            configs[f"deep k={k}"] = lambda k=k: deep[k].run(x, batch_size=ROWS, deep=True)
            if batch == 1:
                configs[f"deep k={k}, pad 1"] = lambda k=k: deep[k].run(x, batch_size=ROWS, deep=True, pad_multiple=1)
        per: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(rounds):  # interleaved rounds, the order reversed every other round
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for c in order:
                per[c].append(timed(configs[c], repeats) / batch)
            print(f"{name} batch {batch}: round {r + 1}/{rounds}", flush=True)
        plain_s = statistics.median(per["plain"])
        for c, v in per.items():
            s = statistics.median(v)
            k = int(c.split("k=")[1].split(",")[0]) if c.startswith("deep") else None
            rows.append({"guard": name, "batch": batch, "mode": c, "ms_per_image": round(1000 * s, 3),
                         "x_plain": round(s / plain_s, 2), "target_x": (k + 1.2) if k else None,
                         "meets_target": (s / plain_s <= k + 1.2) if k else None,
                         "rounds_ms": [round(1000 * t, 3) for t in v]})
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    out = ["# Deep mode: cost against a plain forward pass", "",
           f"`{res['command']}`; {res['date']}; git {res.get('git', '?')}.", "",
           f"Machine: {m.get('cpu')}, {m.get('cores')} cores; torch threads 1; load average at start "
           f"{res['load_start']}, at end {res['load_end']} (the cores were shared with other jobs: the absolute "
           "times are inflated and noisy; the ratios, measured in interleaved rounds, are the figures to read).", "",
           "Median wall time per image over the rounds' medians. `plain`: the classifier's forward pass alone (one "
           "pass of the batch); `single`: `Guard.run` (padded to 8 rows, passes of at most 128 rows, the service's "
           "default); `deep k`: `Guard.run(deep=True)` (k + 1 rows an input, padded to 8 inputs, passes of 8 inputs: "
           "72 rows for k = 8); `pad 1`: without padding. Target (issue 21): deep/plain <= k + 1.2.", "",
           "| guard | batch | mode | ms / image | x plain | target | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        tgt = f"<= {r['target_x']:.1f}" if r["target_x"] else ""
        met = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "**no**")
        out.append(f"| {r['guard']} | {r['batch']} | {r['mode']} | {r['ms_per_image']:.3f} | {r['x_plain']:.2f} | "
                   f"{tgt} | {met} |")
    out += ["", res["note"], ""]
    if res.get("findings"):
        out += ["## Reading", ""] + [f"- {f}" for f in res["findings"]] + [""]
    sv = res.get("serving")
    if sv:
        out += ["## Serving throughput (bench/deep_serve.py)", "",
                f"`{sv['command']}`; {sv['date']}; the {sv['guard']} guard with the timing deep detector, default "
                f"server settings, .npy requests from client threads on the same machine; median of {sv['rounds']} "
                f"interleaved rounds; load average {sv['load_start']} at start, {sv['load_end']} at end (shared "
                "cores: a floor).", "",
                "| mode | images / request | concurrency | images / s | p50 ms | p95 ms | errors | other cores busy |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['mode']} | {r['images_per_request']} | {r['concurrency']} | {r['images_per_s']} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['errors']} | {r['other_cores_busy']} |" for r in sv["rows"]]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--probes", default="4,8")
    ap.add_argument("--guards", default=",".join(GUARDS))
    ap.add_argument("--out", default=str(ROOT / "bench/results/deep_cost"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ks = [int(k) for k in args.probes.split(",")]
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"command": portable_command(sys.argv, "bench/deep_cost.py"), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime()),
           "git": git, "machine": machine_info(), "load_start": load_average(), "rows": []}
    out = Path(args.out)
    for name in args.guards.split(","):
        res["rows"] += measure(name, *GUARDS[name], ks, args.rounds)
        out.with_suffix(".partial.json").write_text(json.dumps(res, indent=2) + "\n")
    res["load_end"] = load_average()
    res["note"] = ("Batch 1 in the guard pads to 8 rows (single) or 8 inputs of k + 1 rows (deep), so that a row's "
                   "result does not depend on its batch: against an unpadded single forward its cost is that of 8 "
                   "(k + 1) rows, which is what the service pays for a lone one-image request; merged requests fill "
                   "the padding. The deep detectors were fitted here for timing only (see bench/deep_cost.py).")
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    if out.with_suffix(".json").is_file():  # keep bench/deep_serve.py's section
        res["serving"] = json.loads(out.with_suffix(".json").read_text()).get("serving")
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
