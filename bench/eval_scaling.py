"""How the detection evaluation's time and memory grow with the number of test images.

Runs ``nad-guard evaluate`` once per ``--sizes`` value (``--max-images``), each in its own process, with
the attacks already in the cache (a priming run per size fills it first: ``clean-only`` protocol only,
untimed), and records the evaluation's wall time, its per-stage timings (from its ``results.json``) and
the process's peak resident memory (``ru_maxrss`` of the child, from ``os.wait4``). The adaptive
protocol attacks a fixed number of images (``--adaptive-images``), so it is left out here.

Writes ``bench/results/eval_scaling.{json,md}``::

    python bench/eval_scaling.py --sizes 750,1500,3000,6000

A straight line ``a + b * N`` is fitted to the wall time and to the peak memory (least squares); the
Markdown reports it with each size's residual and the marginal cost per image between consecutive sizes.

Peak resident memory of a plain run varies by up to 1 GB between identical runs: glibc raises its
mmap threshold after freeing the forward passes' large activation buffers and then keeps later ones on
its heap. ``--malloc-mmap-threshold 131072`` passes ``MALLOC_MMAP_THRESHOLD_`` to the evaluation
processes, fixing the threshold so that freed buffers go back to the system and the peak tracks what
is actually held (the runs take about twice as long; use it for memory, not for time)::

    python bench/eval_scaling.py --malloc-mmap-threshold 131072 --out bench/results/eval_scaling_memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths_common import RESULTS, command_line, load_snapshot, machine  # noqa: E402

from nad_guard.runinfo import portable_arg  # noqa: E402

PROTOCOLS = "seen,unseen,fgsm-only,clean-only,mispredictions"


def nad_guard_exe() -> str:
    exe = Path(sys.executable).with_name("nad-guard")
    found = str(exe) if exe.is_file() else shutil.which("nad-guard")
    if not found:
        raise SystemExit("the nad-guard command is not installed (pip install -e . in this environment)")
    return found


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """``(exit code, wall seconds, peak resident MiB)`` of ``cmd`` run as a child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, **(env or {})})
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.stderr.write(out[-4000:])
    return p.returncode, wall, usage.ru_maxrss / 1024.0


def fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"intercept": float(a), "slope_per_image": float(b), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "residuals": [float(v) for v in y - pred]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default="bench/results/guard_cifar10-resnet20")
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--suite", default="cifar10")
    ap.add_argument("--attacks", default="fgsm,bim,pgd", help="cheap attacks keep the priming runs short")
    ap.add_argument("--sizes", default="750,1500,3000,6000", help="comma-separated --max-images values")
    ap.add_argument("--protocols", default=PROTOCOLS)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cache-dir", default=None, help="attack cache (default: nad-guard's)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None,
                    help="MALLOC_MMAP_THRESHOLD_ for the timed evaluations (bytes; see the module docstring)")
    ap.add_argument("--out", default=str(RESULTS / "eval_scaling"), help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    exe = nad_guard_exe()
    common = ["--artifact", args.artifact, "--model", args.model, "--data", args.data, "--suite", args.suite,
              "--attacks", args.attacks, "--batch-size", str(args.batch_size), "--device", "cpu", "--quiet",
              *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
    started = load_snapshot()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            out = Path(tmp) / str(n)
            prime = [exe, "evaluate", *common, "--max-images", str(n), "--protocols", "clean-only",
                     "--bootstrap", "10", "--out", str(out / "prime")]
            rc, prime_wall, _ = run(prime)
            if rc:
                raise SystemExit(f"priming run for {n} images failed ({rc})")
            cmd = [exe, "evaluate", *common, "--max-images", str(n), "--protocols", args.protocols,
                   "--bootstrap", str(args.bootstrap), "--out", str(out / "eval")]
            load = os.getloadavg()
            env = ({"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
                   if args.malloc_mmap_threshold else None)
            rc, wall, rss = run(cmd, env)
            if rc:
                raise SystemExit(f"evaluation of {n} images failed ({rc})")
            res = json.loads((out / "eval" / "results.json").read_text())
            cached = all(v.get("from_cache") for split in res["attacks"].values() for v in split.values())
            d = res["data"]
            rows.append({"images": n, "wall_s": round(wall, 1), "reported_s": res["seconds"],
                         "peak_rss_mib": round(rss, 1), "timings": res["timings"], "attacks_cached": cached,
                         "fit_clean": d["fit_clean"], "evaluation_clean": d["evaluation_clean"],
                         "prime_wall_s": round(prime_wall, 1), "loadavg_before": [round(v, 2) for v in load]})
            print(json.dumps(rows[-1]), flush=True)
    x = np.array([r["images"] for r in rows], dtype=float)
    record = {"command": command_line(), "machine": machine(), "started": started, "ended": load_snapshot(),
              "settings": {k: portable_arg(v) if isinstance(v, str) else v for k, v in vars(args).items()}, "rows": rows,
              "fit_wall_s": fit_line(x, np.array([r["wall_s"] for r in rows])),
              "fit_peak_rss_mib": fit_line(x, np.array([r["peak_rss_mib"] for r in rows]))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(record))
    print(out.with_suffix(".md").read_text())


def render(r: dict[str, Any]) -> str:
    rows, ft, fm = r["rows"], r["fit_wall_s"], r["fit_peak_rss_mib"]
    stages = [k for k in rows[0]["timings"] if k != "attacks"]
    m = r["machine"]
    lines = [
        "# Detection evaluation: time and memory against the number of test images", "",
        "Command:", "", "```", r["command"], "```", "",
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, torch {m['torch']}, Python {m['python']}. "
        f"Load average at start {[round(v, 2) for v in r['started']['loadavg']]}, at end "
        f"{[round(v, 2) for v in r['ended']['loadavg']]}.", "",
        f"Each size is one `nad-guard evaluate` process (model `{r['settings']['model']}`, attacks "
        f"`{r['settings']['attacks']}`, protocols `{r['settings']['protocols']}`, {r['settings']['bootstrap']} "
        "bootstrap resamples) with its attacks read from the cache (filled by an untimed priming run). "
        "Peak memory is the process's maximum resident set (`ru_maxrss`)"
        + (f"; the evaluations ran with `MALLOC_MMAP_THRESHOLD_={r['settings']['malloc_mmap_threshold']}` "
           "(fixed glibc mmap threshold: freed buffers go back to the system, runs are slower)."
           if r["settings"].get("malloc_mmap_threshold") else
           "; glibc's default allocator settings (its adaptive mmap threshold makes the peak vary by up to "
           "1 GB between identical runs, see the script's docstring)."), "",
        "| test images | fit / evaluation clean | wall s | peak RSS MiB | attacks cached | "
        + " | ".join(f"{s} s" for s in stages) + " |",
        "| ---: | ---: | ---: | ---: | --- | " + " | ".join("---:" for _ in stages) + " |",
    ]
    for row in rows:
        lines.append(f"| {row['images']:,} | {row['fit_clean']} / {row['evaluation_clean']} | {row['wall_s']:.1f} | "
                     f"{row['peak_rss_mib']:.0f} | {'yes' if row['attacks_cached'] else 'no'} | "
                     + " | ".join(f"{row['timings'].get(s, 0):.1f}" for s in stages) + " |")
    lines += ["", "Marginal cost between consecutive sizes:", "",
              "| from | to | seconds per 1,000 more images | MiB per 1,000 more images |",
              "| ---: | ---: | ---: | ---: |"]
    for a, b in zip(rows, rows[1:]):
        dn = (b["images"] - a["images"]) / 1000
        lines.append(f"| {a['images']:,} | {b['images']:,} | {(b['wall_s'] - a['wall_s']) / dn:.1f} | "
                     f"{(b['peak_rss_mib'] - a['peak_rss_mib']) / dn:.0f} |")
    lines += ["", f"Least-squares line, wall time: {ft['intercept']:.1f} s + {ft['slope_per_image'] * 1000:.1f} s "
              f"per 1,000 images (R^2 {ft['r2']:.4f}; residuals "
              + ", ".join(f"{v:+.1f}" for v in ft["residuals"]) + " s).",
              f"Peak memory: {fm['intercept']:.0f} MiB + {fm['slope_per_image'] * 1000:.0f} MiB per 1,000 images "
              f"(R^2 {fm['r2']:.4f}; residuals " + ", ".join(f"{v:+.0f}" for v in fm["residuals"]) + " MiB).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
