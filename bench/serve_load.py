"""Load test of the BentoML service on loopback: throughput, latency, errors, CPU and server memory.

    .venv/bin/python bench/serve_load.py            # writes bench/results/serve_load.{md,json}

Starts ``bentoml serve service.service:NadGuard`` (the bundled default guard unless NAD_GUARD_DIR /
NAD_GUARD_MODEL_TAG are set; other NAD_GUARD_* variables of this process, e.g.
NAD_GUARD_TORCH_THREADS, are passed on and recorded) on a free loopback port with a temporary
BENTOML_HOME, then:

1. in this process, before the server starts: the raw classifier's batched forward throughput
   (images/s, no hooks, no detector) and the guard's (``Guard.run``), at batch 32, 64, 128 and 256,
   on 1 and on all usable torch threads, in ``--raw-rounds`` interleaved rounds (median reported);
   the best classifier median is the reference of the 0.6x target;
2. for ``/predict_with_trust`` and ``/predict``, at concurrency 1, 8 and 32 (client threads, one
   keep-alive connection each), requests of 1 image and of 32 images, in each input format
   (``--formats``): ``json`` (``{"images": [...]}``, Content-Type application/json) and ``npy``
   (the batch as a float32 .npy body, Content-Type application/x-npy): requests/s, images/s,
   p50/p95/p99 latency, errors (anything but HTTP 200), and CPU: milliseconds of CPU per request
   in the server and in this client, and how many cores other processes kept busy meanwhile;
   then a lone client's 32-image requests before those measurements and right after a burst at the
   highest concurrency (latency after the batching wait has been learned under saturation);
3. paired rounds for the target ratios (``--paired-rounds``): at the highest concurrency, 32-image
   requests in each format to ``/predict_with_trust`` and ``/predict``, and the raw classifier in this
   process (at the batch size and thread count of the best median above, server idle), one after the
   other within each round, the order reversed every other round; per round the ratios trust/predict
   and trust/raw, and their median over the rounds. Step 2 measures each configuration once, minutes
   apart: on this 2-core machine the ratio of two such figures moved from 0.83 to 0.93 between
   identical runs (bench/results/serve_load_runs), as wide as the targets' margins;
4. the server's RSS (the serving process and its worker) after a warm-up and after 10,000 more
   single-image JSON ``/predict_with_trust`` requests at concurrency 32.

With py-spy installed (``pip install py-spy``; ``--py-spy none`` to skip), the server workers are
sampled during the ``/predict_with_trust`` runs at the highest concurrency: their time per request,
split between the model and the HTTP side.

The client runs on the same machine and takes CPU from the server: on a 2-core machine the figures
are a floor. The machine's load average at start and end, the busy processes, and the cores other
processes used during each measurement are recorded with the results: compare runs only when
those are low.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shutil
import signal
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
from paths_common import cpu_model, portable_command, portable_path  # noqa: E402  (bench/ is on sys.path when a script there runs)


def other_busy_processes(seconds: float = 1.0) -> str:
    """How many other processes used more than 5% of a core over ``seconds``, and the cores they kept busy
    (to report the machine's load; their names are theirs, not this benchmark's, and are not recorded)."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter() if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            if pct > 5:
                busy.append(pct)
        except psutil.Error:
            pass
    return f"{len(busy)} above 5% of a core, {sum(busy) / 100:.2f} cores in total" if busy else "none"


def git_state() -> str:
    """The checked-out commit and how many files differ from it ('' outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{head} ({len(dirty)} modified files)" if head and dirty else head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- in-process
RAW_BATCHES = (32, 64, 128, 256)  # the reference is the best of these: the server's passes are up to 128 rows


def raw_throughput(guard: Guard, x: torch.Tensor, batch: int, seconds: float, threads: int) -> dict:
    """Images/s of the bare classifier and of Guard.run on batches of ``batch`` images (one sample each)."""
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


def raw_table(guard: Guard, x: torch.Tensor, threads: list[int], rounds: int, seconds: float) -> list[dict]:
    """:func:`raw_throughput` for every batch size and thread count, ``rounds`` times interleaved (so that a
    slow spell of a shared machine hits every configuration alike); per configuration the median of the
    rounds and its spread (min, max). One sample per configuration, whose maximum over configurations was
    the reference before, picks up the machine's noise: two runs of the same commit gave 2,652 and
    3,276 images/s."""
    configs = [(b, th) for b in RAW_BATCHES for th in threads]
    samples: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for _ in range(rounds):
        for b, th in configs:
            samples[(b, th)].append(raw_throughput(guard, x, b, seconds, th))
    table = []
    for (b, th), runs in samples.items():
        row = {"batch": b, "torch_threads": th, "rounds": rounds, "seconds_per_sample": seconds}
        for key in ("classifier_images_per_s", "guard_run_images_per_s"):
            values = [r[key] for r in runs]
            row[key] = float(np.median(values))
            row[key.replace("_per_s", "_per_s_range")] = [min(values), max(values)]
        table.append(row)
    return table


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

    def processes(self) -> list[psutil.Process]:
        p = psutil.Process(self.proc.pid)
        return [p] + p.children(recursive=True)

    def worker_pids(self) -> list[int]:
        return [q.pid for q in self.processes() if "--service-name" in q.cmdline()]

    def cpu_seconds(self) -> float:
        total = 0.0
        for q in self.processes():
            try:
                c = q.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    def rss_mb(self) -> dict:
        procs = self.processes()

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


FORMATS = {"json": "application/json", "npy": "application/x-npy"}


def body(x: torch.Tensor, fmt: str) -> bytes:
    """A request body holding the batch ``x`` in format ``fmt``."""
    if fmt == "json":
        return json.dumps({"images": x.tolist()}).encode()
    buf = io.BytesIO()
    np.save(buf, x.numpy().astype(np.float32), allow_pickle=False)
    return buf.getvalue()


PROFILE_BUCKETS = (  # (name, test on a py-spy stack), first match wins; see profile_summary
    ("model: GuardResult.records (per-image Python)", lambda st: "WorkerThread.run" in st and "records (" in st),
    ("model: forward, path features, detector", lambda st: "WorkerThread.run" in st and (
        "Guard.run" in st or "forward" in st or "NadGuard.predict" in st)),
    ("worker thread: other (thread hand-over, padding, metrics)", lambda st: "WorkerThread.run" in st),
    ("event loop: waiting in epoll (idle)", lambda st: st.rsplit(";", 1)[-1].startswith(("EpollSelector.select",
                                                                                         "select ("))),
    ("event loop: request parsing and checks (service)", lambda st: "_checked_batch" in st or "_parse_request" in st),
    ("event loop: uvicorn HTTP protocol (h11/httptools)", lambda st: "uvicorn/protocols" in st or "h11/" in st),
    ("event loop: BentoML/Starlette/OpenTelemetry per-request work", lambda st: True),
)


def profile_summary(raw_files: list[Path], seconds: float, rate: int, requests: int) -> dict:
    """Sampled thread time of the server's workers (one py-spy file each) by bucket (``PROFILE_BUCKETS``),
    summed over the workers, in ms per request.
    py-spy samples Python threads: torch's own compute threads are not seen, so the model's figure
    is the time the worker thread spent in it, not the CPU time of all torch threads."""
    counts: dict[str, int] = {name: 0 for name, _ in PROFILE_BUCKETS}
    for line in (line for f in raw_files for line in f.read_text().splitlines()):
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        name = next(name for name, test in PROFILE_BUCKETS if test(stack))
        counts[name] += int(n)
    return {"seconds": seconds, "rate_hz": rate, "requests": requests,
            "ms_per_request": {k: v / rate * 1000 / max(1, requests) for k, v in counts.items()}}


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, not waiting for I/O)."""
    c = psutil.cpu_times()
    return sum(c) - c.idle - getattr(c, "iowait", 0.0)


def load(port: int, path: str, bodies: list[bytes], n_requests: int, concurrency: int,
         content_type: str = "application/json", server: "Server | None" = None, py_spy: str | None = None) -> dict:
    """``n_requests`` POSTs of ``bodies`` (cycled) from ``concurrency`` threads, one keep-alive
    connection each; returns throughput, latency percentiles, errors and CPU use (server's, this
    client's, and other processes')."""
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
                conn.request("POST", path, body=body, headers={"Content-Type": content_type})
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
    me = psutil.Process()
    spies: list[subprocess.Popen] = []
    raw_files: list[Path] = []
    if py_spy and server:  # sample the server's worker processes while the load runs
        spy_dir = Path(tempfile.mkdtemp(prefix="nad-guard-spy-"))
        for pid in server.worker_pids():
            raw_files.append(spy_dir / f"stacks-{pid}.txt")
            spies.append(subprocess.Popen([py_spy, "record", "-p", str(pid), "-r", "100", "--nonblocking",
                                           "--format", "raw", "-o", str(raw_files[-1])], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # py-spy attaches
    cpu0, srv0, busy0 = sum(me.cpu_times()[:2]), server.cpu_seconds() if server else 0.0, busy_cpu_seconds()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    profile = None
    if spies:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        try:
            for spy in spies:
                spy.wait(60)
            profile = profile_summary(raw_files, wall, 100, n_requests)
        except (subprocess.TimeoutExpired, OSError, ValueError) as e:
            for spy in spies:
                spy.kill()
            profile = {"error": repr(e)}
    client_cpu = sum(me.cpu_times()[:2]) - cpu0
    server_cpu = (server.cpu_seconds() - srv0) if server else float("nan")
    other_cpu = busy_cpu_seconds() - busy0 - client_cpu - (server_cpu if server else 0.0)
    ms = np.array(lat) * 1000
    return {"requests": n_requests, "concurrency": concurrency, "seconds": wall, "requests_per_s": n_requests / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors), "error_examples": errors[:3],
            "server_cpu_ms_per_request": server_cpu * 1000 / n_requests,
            "client_cpu_ms_per_request": client_cpu * 1000 / n_requests,
            "server_cores_busy": server_cpu / wall, "client_cores_busy": client_cpu / wall,
            "other_cores_busy": max(0.0, other_cpu / wall), **({"profile": profile} if profile else {})}


def paired_rounds(port: int, bodies: dict, formats: list[str], guard: Guard, x: torch.Tensor, raw_config: dict,
                  rounds: int, n_requests: int, concurrency: int, server: "Server") -> dict:
    """Step 3 of the module docstring: per round and format, 32-image requests to both endpoints and the raw
    classifier's in-process throughput, back to back (order reversed every other round); the per-round
    ratios and their medians."""
    batch, threads = raw_config["batch"], raw_config["torch_threads"]
    per_round: list[dict] = []
    for k in range(rounds):
        steps = [("raw", None)] + [(path, fmt) for fmt in formats for path in ("/predict_with_trust", "/predict")]
        if k % 2:
            steps.reverse()
        got: dict = {"round": k + 1}
        for what, fmt in steps:
            if what == "raw":
                got["raw_images_per_s"] = raw_throughput(guard, x, batch, 3.0, threads)["classifier_images_per_s"]
                continue
            r = load(port, what, bodies[(32, fmt)], n_requests, concurrency, FORMATS[fmt], server)
            got[f"{what.strip('/')} {fmt}"] = {"images_per_s": r["requests_per_s"] * 32, "errors": r["errors"],
                                                "other_cores_busy": r["other_cores_busy"]}
        for fmt in formats:
            t, p = got[f"predict_with_trust {fmt}"]["images_per_s"], got[f"predict {fmt}"]["images_per_s"]
            got[f"ratios {fmt}"] = {"trust_vs_predict": t / p, "trust_vs_raw_classifier": t / got["raw_images_per_s"]}
        print(f"  round {k + 1}: " + ", ".join(f"{fmt} {v['trust_vs_predict']:.2f} / {v['trust_vs_raw_classifier']:.2f}"
                                              for fmt in formats for v in [got[f"ratios {fmt}"]]), flush=True)
        per_round.append(got)
    medians = {}
    for fmt in formats:
        medians[fmt] = {}
        for key in ("trust_vs_predict", "trust_vs_raw_classifier"):
            values = [g[f"ratios {fmt}"][key] for g in per_round]
            medians[fmt][key] = float(np.median(values))
            medians[fmt][f"{key}_range"] = [min(values), max(values)]
        medians[fmt]["trust_images_per_s"] = float(np.median(
            [g[f"predict_with_trust {fmt}"]["images_per_s"] for g in per_round]))
    return {"rounds": rounds, "requests_per_measurement": n_requests, "concurrency": concurrency,
            "images_per_request": 32, "raw_batch": batch, "raw_torch_threads": threads,
            "raw_seconds_per_sample": 3.0, "per_round": per_round, "medians": medians,
            "errors": sum(g[k]["errors"] for g in per_round for k in g if isinstance(g[k], dict) and "errors" in g[k])}


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per single-image measurement")
    ap.add_argument("--batched-requests", type=int, default=600, help="requests per 32-image measurement")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--raw-rounds", type=int, default=5, help="interleaved rounds of the in-process measurements "
                    "(1.5 s per configuration and round; the median is reported)")
    ap.add_argument("--paired-rounds", type=int, default=5, help="rounds of the paired target measurement (step 3 "
                    "above; 0 skips it)")
    ap.add_argument("--paired-requests", type=int, default=300, help="32-image requests per endpoint, format and "
                    "paired round")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--formats", default="json,npy", help="request body formats: json, npy (comma-separated)")
    ap.add_argument("--py-spy", default="auto", help="py-spy executable for the server-time breakdown (pip install "
                    "py-spy); 'auto': the one on PATH if any; 'none': no profile")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load"))
    args = ap.parse_args(argv)
    py_spy = (shutil.which("py-spy") if args.py_spy == "auto" else None if args.py_spy == "none" else args.py_spy)
    levels = [int(c) for c in args.concurrency.split(",")]
    formats = [f for f in args.formats.split(",") if f]
    if not formats or set(formats) - set(FORMATS):
        ap.error(f"--formats takes some of {', '.join(FORMATS)}")

    info = {
        "command": portable_command(["", *(argv if argv is not None else sys.argv[1:])],  # no absolute paths
                                    program=".venv/bin/python bench/serve_load.py"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "load_average_start": os.getloadavg(), "other_busy_processes_start": other_busy_processes(),
        "python": platform.python_version(), "torch": torch.__version__,
        "guard": (portable_path(os.environ["NAD_GUARD_DIR"]) if os.environ.get("NAD_GUARD_DIR") else
                  os.environ.get("NAD_GUARD_MODEL_TAG") or "bundled default"),
        "server_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NAD_GUARD_", "OMP_"))},
        "server_python_path": os.environ.get("PYTHONPATH", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "git": git_state(),
    }
    import bentoml

    info["bentoml"] = bentoml.__version__
    x = load_dataset("mnist5k")[1].float(0, 256)
    guard = Guard.load(os.environ.get("NAD_GUARD_DIR") or DEFAULT_GUARD_DIR)
    print("raw model in-process ...", flush=True)
    thread_counts = sorted({1, len(os.sched_getaffinity(0))})
    raw = raw_table(guard, x, thread_counts, args.raw_rounds, 1.5)
    best_config = max(raw, key=lambda r: r["classifier_images_per_s"])

    bodies = {(1, fmt): [body(x[i:i + 1], fmt) for i in range(64)] for fmt in formats}
    bodies.update({(32, fmt): [body(x[i:i + 32], fmt) for i in range(0, 224, 32)] for fmt in formats})
    info["body_bytes"] = {f"{fmt} x{ipr}": len(b[0]) for (ipr, fmt), b in bodies.items()}
    results = []
    with tempfile.TemporaryDirectory(prefix="nad-guard-bench-") as home:
        server = Server(Path(home))
        try:
            for fmt in formats:  # warm-up (and the batching optimiser)
                for path in ("/predict_with_trust", "/predict"):
                    load(server.port, path, bodies[(1, fmt)], 300, 8, FORMATS[fmt])
            rss_before = server.rss_mb()
            info["server_workers"] = len(server.worker_pids())
            lone_fmt = "npy" if "npy" in formats else formats[0]
            lone = {"format": lone_fmt, "images_per_request": 32,
                    "before": load(server.port, "/predict_with_trust", bodies[(32, lone_fmt)], 50, 1,
                                   FORMATS[lone_fmt], server)}
            for images_per_request, n in ((1, args.requests), (32, args.batched_requests)):
                for fmt in formats:
                    for c in levels:
                        for path in ("/predict_with_trust", "/predict"):
                            print(f"{path} x{images_per_request} {fmt} c={c} ...", flush=True)
                            spy = py_spy if (c == max(levels) and path == "/predict_with_trust") else None
                            r = load(server.port, path, bodies[(images_per_request, fmt)], n, c, FORMATS[fmt], server,
                                     spy)
                            r.update(endpoint=path, images_per_request=images_per_request, format=fmt,
                                     images_per_s=r["requests_per_s"] * images_per_request)
                            results.append(r)
            paired = None
            if args.paired_rounds > 0:
                print(f"paired rounds at c={max(levels)} ...", flush=True)
                paired = paired_rounds(server.port, bodies, formats, guard, x, best_config, args.paired_rounds,
                                       args.paired_requests, max(levels), server)
            print("lone client after a burst ...", flush=True)
            lone["burst"] = load(server.port, "/predict_with_trust", bodies[(32, lone_fmt)], 200, max(levels),
                                 FORMATS[lone_fmt], server)
            lone["after"] = load(server.port, "/predict_with_trust", bodies[(32, lone_fmt)], 50, 1,
                                 FORMATS[lone_fmt], server)
            rss_mid = server.rss_mb()
            print(f"memory: {args.memory_requests} requests ...", flush=True)
            mem_fmt = "json" if "json" in formats else formats[0]
            mem_run = load(server.port, "/predict_with_trust", bodies[(1, mem_fmt)], args.memory_requests, 32,
                           FORMATS[mem_fmt], server)
            rss_after = server.rss_mb()
        finally:
            server.stop()
    info["load_average_end"] = os.getloadavg()
    info["other_busy_processes_end"] = other_busy_processes()

    growth = (rss_after["total_mb"] - rss_mid["total_mb"]) / rss_mid["total_mb"]
    best_raw = max(r["classifier_images_per_s"] for r in raw)  # the best batch size and thread count (medians)
    by = {(r["endpoint"], r["images_per_request"], r["format"], r["concurrency"]): r for r in results}
    c_max = max(levels)
    checks = {}
    for ipr in (1, 32):
        for fmt in formats:
            t, p = by[("/predict_with_trust", ipr, fmt, c_max)], by[("/predict", ipr, fmt, c_max)]
            checks[f"x{ipr} {fmt}"] = {"images_per_request": ipr, "format": fmt,
                                       "trust_images_per_s": t["images_per_s"],
                                       "trust_vs_predict": t["images_per_s"] / p["images_per_s"],
                                       "trust_vs_raw_classifier": t["images_per_s"] / best_raw,
                                       "other_cores_busy": t["other_cores_busy"]}
    summary = {"info": info, "raw_in_process": raw, "raw_reference_images_per_s": best_raw, "http": results,
               "lone_client_after_burst": lone, "paired": paired,
               "memory": {"requests": args.memory_requests, "format": mem_fmt, "run": mem_run,
                          "rss_after_warmup": rss_before, "rss_before_10k": rss_mid, "rss_after_10k": rss_after,
                          "growth": growth},
               "targets": {"concurrency": c_max, "ratios": checks,
                           "errors": sum(r["errors"] for r in results) + mem_run["errors"]
                           + (paired["errors"] if paired else 0)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


def _busy(value: str | list) -> str:
    """``other_busy_processes``'s summary (older result files hold a list)."""
    return value if isinstance(value, str) else (f"{len(value)} above 5% of a core" if value else "none")


def markdown(s: dict) -> str:
    i, m, tg = s["info"], s["memory"], s["targets"]
    env = ", ".join(f"{k}={v}" for k, v in i.get("server_environment", {}).items()) or "none (defaults)"
    lines = [
        "# Serving load test (`bench/serve_load.py`)", "",
        f"Command: `{i['command']}` (from the repository root), started {i['started']}"
        f"{', at commit ' + i['git'] if i.get('git') else ''}. "
        f"NAD_GUARD_* and OMP_* settings passed to the server: {env}; serving processes: "
        f"{i.get('server_workers', 'not recorded')}.", "",
        f"Machine: {i['cpu']}, {i['cores']} cores ({i['usable_cores']} usable); Python {i['python']}, "
        f"torch {i['torch']}, BentoML {i['bentoml']}. Guard: {i['guard']}. Load average (1/5/15 min) "
        f"at start {tuple(round(v, 2) for v in i['load_average_start'])}, at end "
        f"{tuple(round(v, 2) for v in i['load_average_end'])} (this benchmark's own client and server "
        "included); other processes at start: "
        f"{_busy(i['other_busy_processes_start'])}; at end: "
        f"{_busy(i['other_busy_processes_end'])}. Client and server share the machine; "
        "the `other cores` column below is how many cores other processes kept busy during each "
        "measurement (0 on a quiet machine; anything near 1 or more halves what is left to this benchmark).", "",
        *([f"**Not a quiet-machine run:** other processes kept {busy:.1f} of the {i['usable_cores']} cores busy on "
            "average during the HTTP measurements, and were busy during the in-process reference too, so every figure "
            "below (the raw reference included) is depressed by an unknown and varying amount and the ratios are "
            "not reliable. Rerun the command above on a quiet machine.", ""]
          if (busy := float(np.mean([r.get("other_cores_busy", 0.0) for r in s["http"]]))) > 0.25 else []),
        "## Raw model, in-process (images/s)", "",
        f"Median of {s['raw_in_process'][0].get('rounds', 1)} interleaved rounds per configuration "
        f"({s['raw_in_process'][0].get('seconds_per_sample', 3.0)} s each), with the range of the rounds.", "",
        "| batch | torch threads | classifier forward | range | Guard.run (forward + paths + detector) | range |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |"]

    def span(r: dict, key: str) -> str:
        lo, hi = r.get(f"{key}_images_per_s_range", [r[f"{key}_images_per_s"]] * 2)
        return f"{lo:,.0f}-{hi:,.0f}"

    for r in s["raw_in_process"]:
        lines.append(f"| {r['batch']} | {r['torch_threads']} | {r['classifier_images_per_s']:,.0f} | "
                     f"{span(r, 'classifier')} | {r['guard_run_images_per_s']:,.0f} | {span(r, 'guard_run')} |")
    lines += ["", f"Reference for the 0.6x target: the best classifier median, {s['raw_reference_images_per_s']:,.0f} "
              "images/s.", "",
              "## HTTP, one keep-alive connection per client thread", "",
              "Formats: `json` = `{\"images\": [...]}` (application/json); `npy` = the batch as a float32 .npy "
              "body (application/x-npy). Request body sizes: "
              + ", ".join(f"{k} {v:,} bytes" for k, v in i.get("body_bytes", {}).items()) + ". CPU ms/request: "
              "CPU time of the server's processes, and of this load generator, divided by the requests. Server cores: "
              "the server's CPU time divided by the wall time (how much of the machine it kept busy).", "",
              "| endpoint | images/request | format | concurrency | requests/s | images/s | p50 ms | p95 ms | p99 ms "
              "| errors | server CPU ms/req | server cores | client CPU ms/req | other cores |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["http"]:
        lines.append(f"| `{r['endpoint']}` | {r['images_per_request']} | {r.get('format', 'json')} | "
                     f"{r['concurrency']} | {r['requests_per_s']:,.0f} | {r['images_per_s']:,.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                     f"{r.get('server_cpu_ms_per_request', float('nan')):.2f} | "
                     f"{r.get('server_cores_busy', float('nan')):.2f} | "
                     f"{r.get('client_cpu_ms_per_request', float('nan')):.2f} | "
                     f"{r.get('other_cores_busy', float('nan')):.2f} |")
    profiled = [r for r in s["http"] if isinstance(r.get("profile"), dict) and "ms_per_request" in r["profile"]]
    if profiled:
        buckets = list(profiled[0]["profile"]["ms_per_request"])
        lines += ["", "## Where the server's time goes (py-spy, `/predict_with_trust` at the highest concurrency)", "",
                  "Sampled time of the server workers' Python threads (100 Hz, summed over the workers), in ms per "
                  "request. The model's row is the time the worker thread spent in the guard (torch's own compute threads are not "
                  "sampled); the event-loop rows are CPU work on the HTTP side; `waiting in epoll` is idle time.", "",
                  "| bucket | " + " | ".join(f"{r['images_per_request']} img {r['format']}" for r in profiled) + " |",
                  "| --- | " + " | ".join("---:" for _ in profiled) + " |"]
        for b in buckets:
            lines.append(f"| {b} | " + " | ".join(f"{r['profile']['ms_per_request'][b]:.2f}" for r in profiled) + " |")
    if lone := s.get("lone_client_after_burst"):
        b, a, burst = lone["before"], lone["after"], lone["burst"]
        lines += ["", "## A lone client after a burst", "",
                  f"One client, {lone['images_per_request']}-image `{lone['format']}` requests to `/predict_with_trust`, "
                  f"{b['requests']} before the measurements above and {a['requests']} right after "
                  f"{burst['requests']} more at concurrency {burst['concurrency']} "
                  f"(BentoML 1.4 learned its batching wait from saturated batches and then held every lone "
                  f"request back that long; the service caps the wait, `NAD_GUARD_BATCH_WAIT_MS`).", "",
                  "| | p50 ms | p95 ms | requests/s |", "| --- | ---: | ---: | ---: |",
                  f"| before | {b['p50_ms']:.1f} | {b['p95_ms']:.1f} | {b['requests_per_s']:.1f} |",
                  f"| after the burst | {a['p50_ms']:.1f} | {a['p95_ms']:.1f} | {a['requests_per_s']:.1f} |"]
    run = m["run"]
    lines += ["", "## Memory", "",
              f"Server RSS (the serving process and its {i.get('server_workers', '')} worker(s), summed): "
              f"{m['rss_after_warmup']['total_mb']:.0f} MB after warm-up, "
              f"{m['rss_before_10k']['total_mb']:.0f} MB after the measurements above, "
              f"{m['rss_after_10k']['total_mb']:.0f} MB after {m['requests']:,} more single-image "
              f"{m.get('format', 'json')} `/predict_with_trust` requests at concurrency 32 "
              f"({run['requests_per_s']:,.0f} requests/s, p99 {run['p99_ms']:.1f} ms, {run['errors']} errors): "
              f"growth {m['growth'] * 100:+.2f}%.", "",
              f"## Targets (concurrency {tg['concurrency']})", "",
              "| requests of | format | trust images/s | trust / predict (target >= 0.85) "
              "| trust / best raw classifier (target >= 0.6) | other cores busy |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for v in tg["ratios"].values():
        lines.append(f"| {v['images_per_request']} image(s) | {v['format']} | {v['trust_images_per_s']:,.0f} | "
                     f"{v['trust_vs_predict']:.2f} | {v['trust_vs_raw_classifier']:.2f} | "
                     f"{v['other_cores_busy']:.2f} |")
    lines += ["", f"Errors over all requests: {tg['errors']}. Memory growth over {m['requests']:,} requests: "
              f"{m['growth'] * 100:+.2f}% (target < 5%).", ""]
    if pr := s.get("paired"):
        lines += [f"## Paired rounds (concurrency {pr['concurrency']}, 32-image requests)", "",
                  f"The ratios above divide figures measured minutes apart. Here, in each of {pr['rounds']} rounds, "
                  f"{pr['requests_per_measurement']} requests per endpoint and format and {pr['raw_seconds_per_sample']:.0f} s "
                  f"of the raw classifier in-process (batch {pr['raw_batch']}, {pr['raw_torch_threads']} torch threads: "
                  "the best median of the raw table; the server idle meanwhile) run back to back, the order reversed "
                  "every other round; a ratio is taken within each round, and the median over the rounds is the "
                  "figure for the targets.", "",
                  "| round | " + " | ".join(f"{f} trust / predict | {f} trust / raw" for f in pr["medians"])
                  + " | raw images/s |",
                  "| ---: | " + " | ".join("---: | ---:" for _ in pr["medians"]) + " | ---: |"]
        for g in pr["per_round"]:
            lines.append(f"| {g['round']} | " + " | ".join(
                f"{g[f'ratios {f}']['trust_vs_predict']:.2f} | {g[f'ratios {f}']['trust_vs_raw_classifier']:.2f}"
                for f in pr["medians"]) + f" | {g['raw_images_per_s']:,.0f} |")
        lines += ["", "| format | trust images/s (median) | trust / predict, median (range) (target >= 0.85) "
                  "| trust / raw, median (range) (target >= 0.6) |", "| --- | ---: | ---: | ---: |"]
        for f, v in pr["medians"].items():
            lo, hi = v["trust_vs_predict_range"]
            lo2, hi2 = v["trust_vs_raw_classifier_range"]
            lines.append(f"| {f} | {v['trust_images_per_s']:,.0f} | {v['trust_vs_predict']:.2f} ({lo:.2f}-{hi:.2f}) | "
                         f"{v['trust_vs_raw_classifier']:.2f} ({lo2:.2f}-{hi2:.2f}) |")
        lines += ["", f"Errors in the paired rounds: {pr['errors']}.", ""]
    by = {(r["endpoint"], r["images_per_request"], r.get("format", "json"), r["concurrency"]): r for r in s["http"]}
    c = tg["concurrency"]
    best = max((v for v in tg["ratios"].values() if v["images_per_request"] == 32),
               key=lambda v: v["trust_images_per_s"], default=None)
    guard_best = max(r["guard_run_images_per_s"] for r in s["raw_in_process"])
    if best:
        t32 = by[("/predict_with_trust", 32, best["format"], c)]
        t1 = max((by[k] for k in by if k[0] == "/predict_with_trust" and k[1] == 1 and k[3] == c),
                 key=lambda r: r["images_per_s"])
        lines += ["## Reading", "",
                  f"Best configuration for the targets: 32-image `{best['format']}` requests, "
                  f"{best['trust_images_per_s']:,.0f} images/s = {best['trust_vs_raw_classifier']:.2f} of the raw "
                  f"classifier and {best['trust_images_per_s'] / guard_best:.2f} of in-process `Guard.run` at its best "
                  f"({guard_best:,.0f} images/s, the ceiling of `/predict_with_trust` with the whole machine and no "
                  f"HTTP). Server CPU per 32-image request: {t32['server_cpu_ms_per_request']:.1f} ms "
                  f"({t32['server_cpu_ms_per_request'] / 32:.2f} ms per image); the client's: "
                  f"{t32['client_cpu_ms_per_request']:.2f} ms.", "",
                  f"Single-image requests (best format `{t1['format']}`): {t1['images_per_s']:,.0f} images/s at "
                  f"concurrency {c}, {t1['server_cpu_ms_per_request']:.2f} ms of server CPU and "
                  f"{t1['client_cpu_ms_per_request']:.2f} ms of client CPU per request, against "
                  f"{1000 / guard_best:.2f} ms per image for the guard's compute in-process: per-request HTTP and "
                  "framework cost, not the model, bounds them (see README, Serving).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
