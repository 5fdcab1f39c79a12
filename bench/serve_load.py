"""Load test of the BentoML service on loopback: throughput, latency, errors and server memory.

    .venv/bin/python bench/serve_load.py            # writes bench/results/serve_load.{md,json}

Starts ``bentoml serve service.service:NadGuard`` (the bundled default guard unless NAD_GUARD_DIR /
NAD_GUARD_MODEL_TAG are set) on a free loopback port with a temporary BENTOML_HOME, then:

1. in this process, before the server starts: the raw classifier's batched forward throughput
   (images/s, no hooks, no detector) and the guard's (``Guard.run``), at batch 32 and 256;
2. for ``/predict_with_trust`` and ``/predict``, at concurrency 1, 8 and 32 (client threads, one
   keep-alive connection each), requests of 1 image and of 32 images (JSON ``images``):
   requests/s, images/s, p50/p95/p99 latency, errors (anything but HTTP 200);
3. the server's RSS (the serving process and its workers) after a warm-up and after 10,000 more
   single-image ``/predict_with_trust`` requests at concurrency 32.

The client runs on the same machine and takes CPU from the server: on a 2-core machine the figures
are a floor. The machine's load average at start and end is recorded with the results.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard  # noqa: E402
from paths_common import cpu_model  # noqa: E402  (bench/ is on sys.path when a script there runs)


def other_busy_processes(seconds: float = 1.0) -> list[str]:
    """Other processes using more than 5% of a core over ``seconds`` (to report the machine's load)."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter(["name"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    out = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            if pct > 5:
                out.append(f"{p.info['name']} (pid {p.pid}) {pct:.0f}%")
        except psutil.Error:
            pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- in-process
def raw_throughput(guard: Guard, x: torch.Tensor, batch: int, seconds: float, threads: int) -> dict:
    """Images/s of the bare classifier and of Guard.run on batches of ``batch`` images."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    xb = x[:batch]
    out = {"batch": batch, "torch_threads": threads}
    try:
        for name, fn in (("classifier", lambda: guard.classifier(xb)), ("guard_run", lambda: guard.run(xb))):
            with torch.no_grad():
                fn()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    fn()
                    n += batch
                out[f"{name}_images_per_s"] = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return out


# ---------------------------------------------------------------------------------------- server
class Server:
    def __init__(self, home: Path):
        self.port = free_port()
        env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
        self.log = open(home / "server.log", "wb")
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve",
                                      "service.service:NadGuard", "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(home / 'server.log').read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server not ready after 300 s")
            time.sleep(0.5)

    def rss_mb(self) -> dict:
        p = psutil.Process(self.proc.pid)
        procs = [p] + p.children(recursive=True)
        def name(q: psutil.Process) -> str:
            cmd = q.cmdline()
            return cmd[cmd.index("--service-name") + 1] if "--service-name" in cmd else "bentoml serve (arbiter)"

        per = {f"{name(q)} (pid {q.pid})": q.memory_info().rss / 2**20 for q in procs}
        return {"total_mb": sum(per.values()), "processes": per}

    def stop(self) -> None:
        workers = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        psutil.wait_procs(workers, timeout=10)
        for w in workers:
            if w.is_running():
                w.kill()
        self.log.close()


def load(port: int, path: str, bodies: list[bytes], n_requests: int, concurrency: int) -> dict:
    """``n_requests`` POSTs of ``bodies`` (cycled) from ``concurrency`` threads, one keep-alive
    connection each; returns throughput, latency percentiles and errors."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n_requests))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    with lock:
                        errors.append(f"{r.status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": n_requests, "concurrency": concurrency, "seconds": wall, "requests_per_s": n_requests / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors), "error_examples": errors[:3]}


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per single-image measurement")
    ap.add_argument("--batched-requests", type=int, default=300, help="requests per 32-image measurement")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load"))
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    info = {
        "command": " ".join([".venv/bin/python bench/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "load_average_start": os.getloadavg(), "other_busy_processes_start": other_busy_processes(),
        "python": platform.python_version(), "torch": torch.__version__,
        "guard": os.environ.get("NAD_GUARD_DIR") or os.environ.get("NAD_GUARD_MODEL_TAG") or "bundled default",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    import bentoml

    info["bentoml"] = bentoml.__version__
    x = load_dataset("mnist5k")[1].float(0, 256)
    guard = Guard.load(os.environ.get("NAD_GUARD_DIR") or DEFAULT_GUARD_DIR)
    print("raw model in-process ...", flush=True)
    raw = [raw_throughput(guard, x, b, 3.0, th) for b in (32, 256) for th in (1, len(os.sched_getaffinity(0)))]
    del guard

    single = [json.dumps({"images": x[i:i + 1].tolist()}).encode() for i in range(64)]
    batched = [json.dumps({"images": x[i:i + 32].tolist()}).encode() for i in range(0, 224, 32)]
    results = []
    with tempfile.TemporaryDirectory(prefix="nad-guard-bench-") as home:
        server = Server(Path(home))
        try:
            for path in ("/predict_with_trust", "/predict"):  # warm-up (and the batching optimiser)
                load(server.port, path, single, 300, 8)
            rss_before = server.rss_mb()
            for images_per_request, bodies, n in ((1, single, args.requests), (32, batched, args.batched_requests)):
                for c in levels:
                    for path in ("/predict_with_trust", "/predict"):
                        print(f"{path} x{images_per_request} c={c} ...", flush=True)
                        r = load(server.port, path, bodies, n, c)
                        r.update(endpoint=path, images_per_request=images_per_request,
                                 images_per_s=r["requests_per_s"] * images_per_request)
                        results.append(r)
            rss_mid = server.rss_mb()
            print(f"memory: {args.memory_requests} requests ...", flush=True)
            mem_run = load(server.port, "/predict_with_trust", single, args.memory_requests, 32)
            rss_after = server.rss_mb()
        finally:
            server.stop()
    info["load_average_end"] = os.getloadavg()
    info["other_busy_processes_end"] = other_busy_processes()

    growth = (rss_after["total_mb"] - rss_mid["total_mb"]) / rss_mid["total_mb"]
    best_raw = max(r["classifier_images_per_s"] for r in raw)  # the best batch size and thread count
    by = {(r["endpoint"], r["images_per_request"], r["concurrency"]): r for r in results}
    c_max = max(levels)
    checks = {}
    for ipr in (1, 32):
        t, p = by[("/predict_with_trust", ipr, c_max)], by[("/predict", ipr, c_max)]
        checks[f"x{ipr}"] = {"trust_vs_predict": t["images_per_s"] / p["images_per_s"],
                             "trust_vs_raw_classifier": t["images_per_s"] / best_raw}
    summary = {"info": info, "raw_in_process": raw, "raw_reference_images_per_s": best_raw, "http": results,
               "memory": {"requests": args.memory_requests, "run": mem_run, "rss_after_warmup": rss_before,
                          "rss_before_10k": rss_mid, "rss_after_10k": rss_after, "growth": growth},
               "targets": {"concurrency": c_max, "ratios": checks,
                           "errors": sum(r["errors"] for r in results) + mem_run["errors"]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict) -> str:
    i, m, tg = s["info"], s["memory"], s["targets"]
    lines = [
        "# Serving load test (`bench/serve_load.py`)", "",
        f"Command: `{i['command']}` (from the repository root), started {i['started']}.", "",
        f"Machine: {i['cpu']}, {i['cores']} cores ({i['usable_cores']} usable); Python {i['python']}, "
        f"torch {i['torch']}, BentoML {i['bentoml']}. Guard: {i['guard']}. Load average (1/5/15 min) "
        f"at start {tuple(round(v, 2) for v in i['load_average_start'])}, at end "
        f"{tuple(round(v, 2) for v in i['load_average_end'])} (this benchmark's own client and server "
        "included); other processes above 5% of a core at start: "
        f"{', '.join(i['other_busy_processes_start']) or 'none'}; at end: "
        f"{', '.join(i['other_busy_processes_end']) or 'none'}. Client and server share the machine.", "",
        "## Raw model, in-process (images/s)", "",
        "| batch | torch threads | classifier forward | Guard.run (forward + paths + detector) |",
        "| ---: | ---: | ---: | ---: |"]
    for r in s["raw_in_process"]:
        lines.append(f"| {r['batch']} | {r['torch_threads']} | {r['classifier_images_per_s']:,.0f} | "
                     f"{r['guard_run_images_per_s']:,.0f} |")
    lines += ["", "## HTTP (JSON `images`), one keep-alive connection per client thread", "",
              "| endpoint | images/request | concurrency | requests/s | images/s | p50 ms | p95 ms | p99 ms | errors |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["http"]:
        lines.append(f"| `{r['endpoint']}` | {r['images_per_request']} | {r['concurrency']} | "
                     f"{r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    run = m["run"]
    lines += ["", "## Memory", "",
              f"Server RSS (serving process + workers): {m['rss_after_warmup']['total_mb']:.0f} MB after warm-up, "
              f"{m['rss_before_10k']['total_mb']:.0f} MB after the measurements above, "
              f"{m['rss_after_10k']['total_mb']:.0f} MB after {m['requests']:,} more single-image "
              f"`/predict_with_trust` requests at concurrency 32 ({run['requests_per_s']:,.0f} requests/s, "
              f"p99 {run['p99_ms']:.1f} ms, {run['errors']} errors): growth {m['growth'] * 100:+.2f}%.", "",
              f"## Targets (concurrency {tg['concurrency']})", "",
              "| requests of | trust / predict images/s (target >= 0.85) "
              "| trust / best raw classifier images/s (target >= 0.6) |",
              "| --- | ---: | ---: |"]
    for k, v in tg["ratios"].items():
        lines.append(f"| {k[1:]} image(s) | {v['trust_vs_predict']:.2f} | {v['trust_vs_raw_classifier']:.2f} |")
    lines += ["", f"Errors over all requests: {tg['errors']}. Memory growth over {m['requests']:,} requests: "
              f"{m['growth'] * 100:+.2f}% (target < 5%).", ""]
    by = {(r["endpoint"], r["images_per_request"], r["concurrency"]): r for r in s["http"]}
    c = tg["concurrency"]
    best = by.get(("/predict_with_trust", 32, c))
    one_thread = max((r["guard_run_images_per_s"] for r in s["raw_in_process"] if r["torch_threads"] == 1),
                     default=None)
    if best and one_thread:
        lines += ["## Reading", "",
                  "The runner does the guard's compute on one torch thread (the other core serves HTTP), so its "
                  f"ceiling is in-process `Guard.run` on one thread: {one_thread:,.0f} images/s. Over HTTP, "
                  f"32-image requests at concurrency {c} reach {best['images_per_s']:,.0f} images/s "
                  f"({best['images_per_s'] / one_thread:.2f} of that ceiling); single-image requests are bound by "
                  "BentoML's per-request cost (two HTTP hops, about 2 ms of CPU each on this machine), not by the "
                  "model.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
