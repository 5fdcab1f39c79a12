"""Benchmarks of path disentanglement (joint vs NAD schedule, subnetwork quality, feature cost, CDRP cost).

Subcommands (each appends its runs to ``bench/results/paths_<name>.json``; ``report`` renders the
Markdown files from those)::

    python bench/paths_bench.py schedules --model mnist-cnn --data mnist5k \
        --joint epochs=5,lr=0.05,batch_size=64 --nad beta=1.0
    python bench/paths_bench.py overhead --model mnist-cnn --artifact runs/bench-paths/mnist-cnn-joint
    python bench/paths_bench.py critical --model mnist-cnn --batch-sizes 1,8,32,128
    python bench/paths_bench.py report

Training images: all of ``--data``'s training split, or with ``--per-class N`` a seeded stratified
subset (the first ``N`` of a seeded permutation of each class's indices, seed ``--subset-seed``); the
same subset feeds both schedules. Subnetwork accuracy etc. come from
:func:`training.paths.evaluate_paths` on the test split.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths_common import (append_record, command_line, fmt, load_snapshot, machine,  # noqa: E402
                    read_records, RESULTS)

from nad_guard.data import ImageSet, load_dataset  # noqa: E402
from nad_guard.models import load_reference  # noqa: E402
from nad_guard.paths import PathModel  # noqa: E402
from training import paths as tp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "runs" / "bench-paths"
DATA_OF = {"mnist-cnn": "mnist5k", "cifar10-resnet20": "cifar10"}


def parse_kv(s: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, s.split(",")):
        k, v = part.split("=", 1)
        if v in ("None", "none"):
            out[k] = None
        else:
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = float(v)
    return out


def stratified(data: ImageSet, per_class: int | None, seed: int, classes: list[int] | None = None) -> ImageSet:
    """``per_class`` seeded images of each class (all if ``None``), optionally only ``classes``."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for k in range(data.num_classes):
        idx = (data.labels == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]  # drawn for every class: same subset whatever `classes`
        if classes is not None and k not in classes:
            continue
        keep.append(idx[:per_class] if per_class is not None else idx)
    idx = torch.cat(keep).sort().values
    return data.subset(idx, f"{data.name}[{per_class or 'all'}/class seed {seed}]")


def load_model(name: str, weights: str | None) -> Any:
    return load_reference(name, weights)


def nad_steps(data: ImageSet, batch_size: int, epochs: int, num_classes: int) -> int:
    counts = torch.bincount(data.labels, minlength=num_classes)
    return int(sum(math.ceil(int(c) / batch_size) for c in counts) * epochs)


# --------------------------------------------------------------------------- schedules

def cmd_schedules(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    clf = load_model(a.model, a.weights)
    train, test = load_dataset(a.data or DATA_OF[a.model])
    full_train_images = len(train)
    classes = [int(c) for c in a.nad_classes.split(",")] if a.nad_classes else None
    sub = stratified(train, a.per_class, a.subset_seed, classes)
    test_eval = stratified(test, a.test_per_class, a.subset_seed) if a.test_per_class else test
    jobs = [("joint", parse_kv(s)) for s in a.joint] + [("nad", parse_kv(s)) for s in a.nad]
    for schedule, cfg in jobs:
        before = load_snapshot()
        t0, c0 = time.perf_counter(), time.process_time()
        if schedule == "joint":
            pm = tp.fit_paths(clf, sub, None, device="cpu", progress=False, **cfg)
        else:
            pm = tp.fit_paths_nad(clf, sub, None, device="cpu", progress=False, **cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = load_snapshot()
        te = time.perf_counter()
        ev = tp.evaluate_paths(pm, test_eval)
        eval_s = time.perf_counter() - te
        tr = pm.training_
        rec: dict[str, Any] = {
            "kind": "schedule", "tag": a.tag, "model": a.model, "schedule": schedule, "config": tr,
            "train_images": len(sub), "train_subset": sub.name, "full_train_images": full_train_images,
            "nad_classes": classes, "test_images": len(test_eval), "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "eval_seconds": round(eval_s, 2), "command": command_line(), "machine": machine(),
            "load_before": before, "load_after": after,
        }
        if schedule == "nad":
            steps = nad_steps(sub, tr["batch_size"], tr["epochs"], clf.num_classes)
            full_steps = nad_steps(train, tr["batch_size"], tr["epochs"], clf.num_classes)
            rec |= {"steps": steps, "seconds_per_step": wall / steps, "full_data_steps": full_steps,
                    "cpu_seconds_per_step": cpu / steps,
                    "full_data_estimate_seconds": round(wall / steps * full_steps, 1),
                    "full_data_estimate_cpu_seconds": round(cpu / steps * full_steps, 1)}
        else:
            steps = math.ceil(len(sub) / tr["batch_size"]) * tr["epochs"]
            rec |= {"steps": steps, "seconds_per_step": wall / steps, "cpu_seconds_per_step": cpu / steps,
                    "final_history": pm.metrics_.get("history", [])[-1:] or None}
        per_class = ev["classes"]
        if classes is not None:
            per_class = [c for k, c in enumerate(per_class) if k in classes]
            kept = pm.kept_fraction()[:, classes]
            ev["kept_fraction_mean_probed"] = kept.mean().item()
        ok = [c["subnet_accuracy_on_correct"] for c in per_class if c["subnet_accuracy_on_correct"] is not None]
        rec["eval"] = {k: v for k, v in ev.items() if k != "similarity"} | {
            "probed_subnet_accuracy_on_correct_mean": sum(ok) / len(ok) if ok else None,
            "probed_subnet_accuracy_on_correct_min": min(ok) if ok else None}
        if a.save and classes is None:
            out = ARTIFACTS / f"{a.model}-{schedule}-{a.tag or 'run'}"
            pm.save(out)
            rec["artifact"] = str(out.relative_to(ROOT))
        path = append_record(f"paths_schedules_{a.model}", rec)
        kept_m = ev.get("kept_fraction_mean_probed", ev["kept_fraction_mean"])
        print(f"[{schedule} {cfg}] wall {wall:.1f}s cpu {cpu:.1f}s steps {steps} kept {kept_m:.3f} "
              f"acc mean {rec['eval']['probed_subnet_accuracy_on_correct_mean']:.4f} "
              f"min {rec['eval']['probed_subnet_accuracy_on_correct_min']:.4f} "
              f"other {ev['subnet_other_rate_mean']:.3f} load {after['loadavg'][0]:.2f} -> {path.name}", flush=True)


# --------------------------------------------------------------------------- overhead

def _time(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _time2(fn, reps: int = 1) -> tuple[float, float]:
    """(wall, process CPU) seconds per call."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps


def cmd_overhead(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    clf = load_model(a.model, a.weights)
    _, test = load_dataset(a.data or DATA_OF[a.model])
    pm = PathModel.load(ROOT / a.artifact, clf)
    x = test.float(0, a.batch_size)
    plain = lambda: clf(x)  # noqa: E731
    feats = lambda: pm.features(x)  # noqa: E731
    sub = lambda: pm.features(x, subnetwork=True)  # noqa: E731
    fns = {"plain_forward": plain, "features": feats, "features_subnetwork": sub}
    before = load_snapshot()
    with torch.no_grad():
        for _ in range(a.warmup):
            for f in fns.values():
                f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpus: dict[str, list[float]] = {k: [] for k in fns}
        gen = torch.Generator().manual_seed(0)
        for _ in range(a.rounds):
            order = torch.randperm(len(fns), generator=gen).tolist()
            names = list(fns)
            for j in order:
                w, c = _time2(fns[names[j]], a.inner)
                times[names[j]].append(w)
                cpus[names[j]].append(c)
    after = load_snapshot()
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(t / p for t, p in zip(times[k], times["plain_forward"]))
              for k in ("features", "features_subnetwork")}
    rec = {
        "kind": "overhead", "model": a.model, "artifact": a.artifact, "batch_size": a.batch_size,
        "rounds": a.rounds, "inner_repeats": a.inner, "warmup": a.warmup,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "p10_p90_ms": {k: [statistics.quantiles(v, n=10)[0] * 1e3, statistics.quantiles(v, n=10)[-1] * 1e3]
                       for k, v in times.items()},
        "ratio_of_medians": {k: med[k] / med["plain_forward"] for k in ("features", "features_subnetwork")},
        "median_paired_ratio": paired, "target_features_ratio": 1.10,
        "cpu_median_ms": {k: statistics.median(v) * 1e3 for k, v in cpus.items()},
        "cpu_ratio_of_medians": {k: statistics.median(cpus[k]) / statistics.median(cpus["plain_forward"])
                                 for k in ("features", "features_subnetwork")},
        "target_met": med["features"] / med["plain_forward"] <= 1.10,
        "command": command_line(), "machine": machine(), "load_before": before, "load_after": after,
    }
    append_record("paths_overhead", rec)
    print({k: round(v, 4) for k, v in rec["ratio_of_medians"].items()}, {k: round(v, 3) for k, v in rec["median_ms"].items()})


# --------------------------------------------------------------------------- critical paths

def cmd_critical(a: argparse.Namespace) -> None:
    from nad_guard.critical import critical_paths

    torch.set_num_threads(a.threads)
    clf = load_model(a.model, a.weights)
    _, test = load_dataset(a.data or DATA_OF[a.model])
    rows = []
    before = load_snapshot()
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        n = max(bs, a.images)
        n = math.ceil(n / bs) * bs
        x = test.float(0, n)
        critical_paths(clf, x[:bs], steps=2, batch_size=bs)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        cp = critical_paths(clf, x, steps=a.steps, batch_size=bs)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"batch_size": bs, "images": n, "seconds": round(sec, 3), "ms_per_image": sec / n * 1e3,
                     "cpu_ms_per_image": cpu / n * 1e3,
                     "kept_fraction_mean": cp.kept_fraction().mean().item(),
                     "gate_mean": torch.cat([g for g in cp.gates.values()], 1).mean().item(),
                     "best_step_mean": cp.best_step.float().mean().item()})
        print(rows[-1], flush=True)
    with torch.no_grad():
        xs = test.float(0, 64)
        tw = [_time2(lambda: clf(xs)) for _ in range(20)]
        fwd = statistics.median(t[0] for t in tw) / 64
        fwd_cpu = statistics.median(t[1] for t in tw) / 64
    rec = {"kind": "critical", "model": a.model, "steps": a.steps, "rows": rows,
           "plain_forward_ms_per_image_at_64": fwd * 1e3,
           "plain_forward_cpu_ms_per_image_at_64": fwd_cpu * 1e3, "command": command_line(), "machine": machine(),
           "load_before": before, "load_after": load_snapshot()}
    append_record("paths_critical", rec)


# --------------------------------------------------------------------------- report

def _load_line(rec: dict[str, Any]) -> str:
    b, e = rec["load_before"], rec["load_after"]
    return f"load average {b['loadavg'][0]:.2f} -> {e['loadavg'][0]:.2f} ({b['utc']} -> {e['utc']})"


def _machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu_model']}, {m['logical_cores']} logical cores, torch {m['torch']}, "
            f"{m['torch_threads']} torch threads, Python {m['python']}")


def cmd_report(a: argparse.Namespace) -> None:
    for model in DATA_OF:
        recs = read_records(f"paths_schedules_{model}")
        if recs:
            (RESULTS / f"paths_schedules_{model}.md").write_text(report_schedules(model, recs))
    recs = read_records("paths_overhead")
    if recs:
        (RESULTS / "paths_overhead.md").write_text(report_overhead(recs))
    recs = read_records("paths_critical")
    if recs:
        (RESULTS / "paths_critical.md").write_text(report_critical(recs))


def combined(recs: list[dict[str, Any]], tag: str) -> dict[str, dict[str, Any]]:
    """Per schedule, the runs tagged ``tag`` merged: a run on all classes as is; NAD runs on disjoint class
    groups (run as separate processes) merged, with wall time and steps summed (the serial cost)."""
    out: dict[str, dict[str, Any]] = {}
    for sched in ("joint", "nad"):
        runs = [r for r in recs if r.get("tag") == tag and r["schedule"] == sched]
        if not runs:
            continue
        if sched == "joint" or runs[0]["nad_classes"] is None:
            runs = runs[:1]
        classes: dict[int, dict[str, Any]] = {}
        kept: dict[int, float] = {}
        for r in runs:
            ev = r["eval"]
            probed = r["nad_classes"] if r["nad_classes"] is not None else range(len(ev["classes"]))
            for k in probed:
                classes[k] = ev["classes"][k]
                kept[k] = sum(v[k] for v in ev["kept_fraction"].values()) / len(ev["kept_fraction"])
        ks = sorted(classes)
        acc = [classes[k]["subnet_accuracy_on_correct"] for k in ks]
        other = [classes[k]["subnet_other_rate"] for k in ks]
        wall = sum(r["wall_seconds"] for r in runs)
        cpu = sum(r["cpu_seconds"] for r in runs) if all("cpu_seconds" in r for r in runs) else None
        steps = sum(r["steps"] for r in runs)
        out[sched] = {"runs": len(runs), "classes": ks, "wall_seconds": wall, "cpu_seconds": cpu, "steps": steps,
                      "config": runs[0]["config"], "train_images": sum(r["train_images"] for r in runs),
                      "kept_mean": sum(kept.values()) / len(kept), "kept_per_class": [kept[k] for k in ks],
                      "acc_mean": sum(acc) / len(acc), "acc_min": min(acc), "acc_per_class": acc,
                      "other_rate_mean": sum(other) / len(other), "other_rate_per_class": other,
                      "full_data_estimate_seconds": (sum(r["full_data_estimate_seconds"] for r in runs)
                                                     if sched == "nad" and len(ks) == 10 and len(runs) > 1
                                                     else runs[0].get("full_data_estimate_seconds")),
                      "load_after": [r["load_after"]["loadavg"][0] for r in runs],
                      "commands": [r["command"] for r in runs]}
    return out


def _full_steps(recs: list[dict[str, Any]], tag: str) -> int:
    r = next(r for r in recs if r.get("tag") == tag and r["schedule"] == "nad")
    return int(r["full_data_steps"])


def report_schedules(model: str, recs: list[dict[str, Any]]) -> str:
    lines = [f"# Path schedules on {model}: joint vs NAD's one-class recipe", "",
             "Generated by `python bench/paths_bench.py report` from "
             f"`paths_schedules_{model}.json` (every run, tuning included, in the order run).", "",
             "Subnetwork accuracy: per class, the binary-mask subnetwork's accuracy on that class's held-out "
             "test images that the original classifies correctly; mean and min over classes. Kept: mean share "
             "of channels kept over gate points and classes. Other rate: share of other classes' correctly "
             "classified test images the class subnetwork labels as its class (mean over classes). "
             "Probe runs (NAD on a few classes only) report those classes.", "",]
    tags = []
    for r in recs:
        if r.get("tag", "").startswith("final") and r["tag"] not in tags:
            tags.append(r["tag"])
    for tag in tags:
        c = combined(recs, tag)
        lines += [f"## Summary: runs tagged `{tag}`", "",
                  "| schedule | config | processes | classes | train imgs | wall s (serial sum) | CPU s | steps | kept mean | "
                  "acc mean | acc min | other rate mean |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for sched, d in c.items():
            cfg = d["config"]
            keys = ("epochs", "batch_size", "lr", "target_keep") if sched == "joint" else ("beta", "epochs", "batch_size", "lr")
            lines.append(f"| {sched} | {', '.join(f'{k}={cfg.get(k)}' for k in keys)} | {d['runs']} | "
                         f"{len(d['classes'])} | {d['train_images']} | {d['wall_seconds']:.1f} | {fmt(d['cpu_seconds'], 1)} | {d['steps']} | {d['kept_mean']:.3f} | "
                         f"{d['acc_mean']:.4f} | {d['acc_min']:.4f} | {d['other_rate_mean']:.3f} |")
        if "joint" in c and "nad" in c and len(c["nad"]["classes"]) == 10:
            j, n = c["joint"], c["nad"]
            sp = n["wall_seconds"] / j["wall_seconds"]
            lines += ["", f"- speed-up, wall (NAD wall / joint wall, sums over processes; wall depends on the "
                      f"shared machine's load): {sp:.1f}x (target >= 5x: {'met' if sp >= 5 else 'not met'})"]
            if j["cpu_seconds"] and n["cpu_seconds"]:
                spc = n["cpu_seconds"] / j["cpu_seconds"]
                lines += [f"- speed-up, process CPU time (1 torch thread; robust to the other jobs' load): "
                          f"**{spc:.1f}x** (target >= 5x: {'met' if spc >= 5 else 'not met'})",
                          f"- NAD on the full training set ({n['steps']} steps here), estimated from the measured CPU "
                          f"time per step: {n['cpu_seconds'] / n['steps'] * _full_steps(recs, tag) / 60:.0f} CPU-min "
                          f"({_full_steps(recs, tag)} steps)"]
            lines += [
                      f"- subnetwork accuracy, joint minus NAD: mean {100 * (j['acc_mean'] - n['acc_mean']):+.2f} "
                      f"points, min {100 * (j['acc_min'] - n['acc_min']):+.2f} points (target: joint within 1 point of NAD "
                      f"or better: {'met' if j['acc_mean'] >= n['acc_mean'] - 0.01 else 'not met'})",
                      f"- kept: joint {j['kept_mean']:.3f}, NAD {n['kept_mean']:.3f} (target ~0.25, at most 0.35)"]
            if n.get("full_data_estimate_seconds") and not n["cpu_seconds"]:
                lines.append(f"- NAD on the full training set, estimated from the measured wall time per step: "
                             f"{n['full_data_estimate_seconds'] / 60:.0f} min")
        for sched, d in c.items():
            lines.append(f"- {sched} per class: " + ", ".join(
                f"{k}: acc {a:.4f} kept {kp:.3f} other {o:.3f}" for k, a, kp, o in
                zip(d["classes"], d["acc_per_class"], d["kept_per_class"], d["other_rate_per_class"])))
        lines.append("")
    lines += ["## All runs", "",
             "| # | tag | schedule | config | threads | train imgs | classes | wall s | CPU s | steps | s/step | kept | acc mean | acc min | other rate | load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(recs):
        c = r["config"]
        keys = ("epochs", "batch_size", "lr", "target_keep", "sparsity") if r["schedule"] == "joint" else (
            "beta", "epochs", "batch_size", "lr")
        cfg = ", ".join(f"{k}={c.get(k)}" for k in keys)
        ev = r["eval"]
        kept = ev.get("kept_fraction_mean_probed", ev["kept_fraction_mean"])
        lines.append(f"| {i} | {r.get('tag') or ''} | {r['schedule']} | {cfg} | {r['machine']['torch_threads']} | "
                     f"{r['train_images']} | "
                     f"{'all' if r['nad_classes'] is None else r['nad_classes']} | {r['wall_seconds']:.1f} | "
                     f"{fmt(r.get('cpu_seconds'), 1)} | "
                     f"{r['steps']} | {r['seconds_per_step']:.4f} | {kept:.3f} | "
                     f"{fmt(ev['probed_subnet_accuracy_on_correct_mean'], 4)} | "
                     f"{fmt(ev['probed_subnet_accuracy_on_correct_min'], 4)} | {fmt(_probed_other(r))} | "
                     f"{r['load_after']['loadavg'][0]:.2f} |")
    lines += ["", "## Per run details", ""]
    for i, r in enumerate(recs):
        ev = r["eval"]
        lines.append(f"### Run {i}: {r['schedule']} {r.get('tag') or ''}")
        lines.append("")
        lines.append(f"- command: `{r['command']}`")
        lines.append(f"- machine: {_machine_line(r['machine'])}")
        lines.append(f"- {_load_line(r)}")
        lines.append(f"- training images: {r['train_images']} ({r['train_subset']}); test images evaluated: "
                     f"{r['test_images']}; wall {r['wall_seconds']} s (evaluation {r['eval_seconds']} s, not included)")
        if r["schedule"] == "nad":
            lines.append(f"- NAD steps {r['steps']}, {r['seconds_per_step'] * 1e3:.1f} ms/step; full training set "
                         f"({r['full_train_images']} images) would take {r['full_data_steps']} steps, estimated "
                         f"{r['full_data_estimate_seconds'] / 60:.1f} min at this per-step time")
        lines.append("- kept per layer: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["kept_fraction_per_layer"].items()))
        probed = r["nad_classes"]
        cls = [c for k, c in enumerate(ev["classes"]) if probed is None or k in probed]
        lines.append("- per class (subnet acc on correct / other rate): " + ", ".join(
            f"{c['class']} {fmt(c['subnet_accuracy_on_correct'], 4)}/{fmt(c['subnet_other_rate'], 3)}" for c in cls))
        lines.append("")
    return "\n".join(lines) + "\n"


def _probed_other(r: dict[str, Any]) -> float | None:
    probed = r["nad_classes"]
    o = [c["subnet_other_rate"] for k, c in enumerate(r["eval"]["classes"])
         if (probed is None or k in probed) and c["subnet_other_rate"] is not None]
    return sum(o) / len(o) if o else None


def report_overhead(recs: list[dict[str, Any]]) -> str:
    lines = ["# Cost of reading paths and features (CPU)", "",
             "Per model: the plain forward `clf(x)`, `PathModel.features(x)` (prediction + all path features, "
             "one pass) and `features(x, subnetwork=True)` (plus the predicted class's subnetwork pass), on the "
             "same batch of test images, in one process, interleaved in a seeded random order per round; "
             "medians over rounds. Target: features / plain <= 1.10.", "",
             "| model | threads | batch | rounds x inner | plain ms | features ms | +subnet ms | features / plain | "
             "median paired ratio | +subnet / plain | CPU-time features / plain | target met | load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        m, q = r["median_ms"], r["ratio_of_medians"]
        cr = r.get("cpu_ratio_of_medians", {}).get("features")
        lines.append(f"| {r['model']} | {r['machine']['torch_threads']} | {r['batch_size']} | {r['rounds']} x {r['inner_repeats']} | "
                     f"{m['plain_forward']:.3f} | {m['features']:.3f} | {m['features_subnetwork']:.3f} | "
                     f"{q['features']:.3f} | {r['median_paired_ratio']['features']:.3f} | "
                     f"{q['features_subnetwork']:.3f} | {fmt(cr)} | {'yes' if r['target_met'] else 'no'} | "
                     f"{r['load_after']['loadavg'][0]:.2f} |")
    lines.append("")
    for r in recs:
        lines += [f"- {r['model']}: `{r['command']}`; {_machine_line(r['machine'])}; {_load_line(r)}; "
                  f"p10-p90 ms: " + ", ".join(f"{k} {v[0]:.2f}-{v[1]:.2f}" for k, v in r["p10_p90_ms"].items())]
    return "\n".join(lines) + "\n"


def report_critical(recs: list[dict[str, Any]]) -> str:
    lines = ["# CDRP-style per-input critical paths: cost vs batch size (CPU)", "",
             "`nad_guard.critical.critical_paths`: per-image gates on every gate point, optimised jointly for a "
             "batch (each image's gates get only its own gradient), soft cross-entropy to the original softmax "
             "+ lambda * sum|gate| (lambda 0.05), SGD lr 0.1 momentum 0.9, gates clamped to [0, 5], best "
             "iterate whose top-1 equals the original kept. Kept fraction: share of gates > 0.5 in the best "
             "iterate.", ""]
    for r in recs:
        lines += [f"## {r['model']}, {r['steps']} steps", "",
                  f"- command: `{r['command']}`", f"- machine: {_machine_line(r['machine'])}", f"- {_load_line(r)}",
                  f"- plain forward at batch 64: {r['plain_forward_ms_per_image_at_64']:.3f} ms/image wall, "
                  f"{r['plain_forward_cpu_ms_per_image_at_64']:.3f} ms/image CPU", "",
                  "| batch | images | wall s | ms / image (wall) | CPU ms / image | x plain forward (CPU) | kept (>0.5) | mean gate | mean best step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['batch_size']} | {row['images']} | {row['seconds']:.2f} | {row['ms_per_image']:.2f} | "
                         f"{row['cpu_ms_per_image']:.2f} | "
                         f"{row['cpu_ms_per_image'] / r['plain_forward_cpu_ms_per_image_at_64']:.0f} | "
                         f"{row['kept_fraction_mean']:.3f} | {row['gate_mean']:.3f} | {row['best_step_mean']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sp = ap.add_subparsers(dest="cmd", required=True)
    for name in ("schedules", "overhead", "critical"):
        p = sp.add_parser(name)
        p.add_argument("--model", required=True, choices=sorted(DATA_OF))
        p.add_argument("--weights", help="weights file (default: the committed reference weights)")
        p.add_argument("--data")
        p.add_argument("--threads", type=int, default=2)
    p = sp.choices["schedules"]
    p.add_argument("--per-class", type=int, help="stratified subset of training images per class (default all)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--test-per-class", type=int, help="evaluate on a stratified test subset (probes)")
    p.add_argument("--joint", action="append", default=[], help="k=v,... for fit_paths (repeatable)")
    p.add_argument("--nad", action="append", default=[], help="k=v,... for fit_paths_nad (repeatable)")
    p.add_argument("--nad-classes", help="probe: train only on these classes' images (comma-separated)")
    p.add_argument("--tag", default="")
    p.add_argument("--save", action="store_true", help="save artifacts under runs/bench-paths/")
    p = sp.choices["overhead"]
    p.add_argument("--artifact", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--inner", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p = sp.choices["critical"]
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--images", type=int, default=128, help="images per batch size (rounded up to whole batches)")
    p.add_argument("--steps", type=int, default=30)
    sp.add_parser("report")
    a = ap.parse_args()
    {"schedules": cmd_schedules, "overhead": cmd_overhead, "critical": cmd_critical, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
