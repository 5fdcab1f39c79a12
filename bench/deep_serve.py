"""Serving throughput of the guard's deep mode: ``/predict_with_trust`` against ``?probes=K``, on loopback.

    .venv/bin/python bench/deep_serve.py     # adds "serving" to bench/results/deep_cost.{json,md}

The committed CIFAR-10 ResNet-20 guard with a deep detector of ``K`` probes fitted for timing
(``bench/deep_cost.py``'s ``with_deep``), saved to a temporary directory and served by ``bentoml serve``
(``bench/serve_load.py``'s ``Server``: default settings, a temporary BENTOML_HOME); then, in interleaved
rounds, ``--requests`` requests of ``--images`` images (``.npy`` bodies) from ``--concurrency`` client
threads to each of ``/predict_with_trust`` and ``/predict_with_trust?probes=K`` (``serve_load.load``):
images/s and latency. The client runs on the same machine, whose cores are shared: a floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from deep_cost import GUARDS, markdown, with_deep  # noqa: E402
from serve_load import Server, body, load  # noqa: E402

from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.guard import Guard  # noqa: E402
from nad_guard.runinfo import load_average, portable_command  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results/deep_cost"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    guard_dir, data, suite = GUARDS["cifar10-resnet20"]
    test = load_dataset(data)[1]
    tmp = Path(tempfile.mkdtemp(prefix="nad-guard-deep-serve-"))
    with_deep(Guard.load(guard_dir), test, suite, args.probes).save(tmp / "guard")
    import os

    os.environ["NAD_GUARD_DIR"] = str(tmp / "guard")
    (tmp / "home").mkdir()
    load0 = load_average()
    server = Server(tmp / "home")
    try:
        bodies = [body(test.float(i, i + args.images), "npy") for i in range(0, 8 * args.images, args.images)]
        paths = {"single": "/predict_with_trust", f"deep k={args.probes}": f"/predict_with_trust?probes={args.probes}"}
        for p in paths.values():  # warm-up (and the batching wait's learning)
            load(server.port, p, bodies, 16, args.concurrency, "application/x-npy")
        per: dict[str, list[dict]] = {m: [] for m in paths}
        for r in range(args.rounds):
            for m in (list(paths) if r % 2 == 0 else list(reversed(paths))):
                per[m].append(load(server.port, paths[m], bodies, args.requests, args.concurrency, "application/x-npy",
                                   server=server))
            print(f"round {r + 1}/{args.rounds}", flush=True)
    finally:
        server.stop()
    rows = []
    for m, runs in per.items():
        rows.append({"mode": m, "images_per_request": args.images, "concurrency": args.concurrency,
                     "images_per_s": round(statistics.median(x["requests_per_s"] * args.images for x in runs), 1),
                     "p50_ms": round(statistics.median(x["p50_ms"] for x in runs), 1),
                     "p95_ms": round(statistics.median(x["p95_ms"] for x in runs), 1),
                     "errors": sum(x["errors"] for x in runs),
                     "other_cores_busy": round(statistics.median(x["other_cores_busy"] for x in runs), 2)})
    out = Path(args.out)
    res = json.loads(out.with_suffix(".json").read_text())
    res["serving"] = {"command": portable_command(sys.argv, "bench/deep_serve.py"),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "guard": "cifar10-resnet20",
                      "load_start": load0, "load_end": load_average(), "rounds": args.rounds, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
