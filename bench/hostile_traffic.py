"""The service under hostile traffic on loopback (issue 17): maximal bodies next to normal traffic,
random paths against /metrics, huge PNGs against worker memory.

    .venv/bin/python bench/hostile_traffic.py      # writes bench/results/hostile_traffic.{md,json}

Starts ``bentoml serve service.service:NadGuard`` with the default settings (the bundled guard, two
worker processes on 2+ cores) on a free loopback port with a temporary BENTOML_HOME (the server of
bench/serve_load.py), then:

1. **normal traffic alone** for ``--seconds``: ``--normal`` clients (one keep-alive connection each)
   sending valid requests to ``/predict_with_trust``, alternately one image as JSON and 32 images as
   ``.npy``; latency percentiles and errors (anything but 200);
2. **the same next to ``--hostile`` clients** sending maximal bodies back to back, one kind each:
   ``json`` (a JSON body at its limit: 21-character numbers, more images than the batch limit, so the
   whole body is read and parsed before the refusal), ``npy`` (a .npy body at its limit: a header
   padded to 10,000 bytes and the largest batch, its last value NaN, so it is read and checked in
   full), ``multipart_png`` (a PNG of grey noise as wide as the pixel limit's square and as tall as the
   image part's byte limit allows, 4096x4080: decoded and answered 200) and
   ``multipart_json`` (the ``images`` part at its limit, as ``json``). The valid requests' errors and
   latency are the result; the hostile ones' answers are counted by status;
3. **1,000 random paths** (``GET``, 900 at the root, 50 under the UI's static files, 50 under a
   prediction route): ``/metrics`` size and scrape time before and after, and the size of the
   Prometheus multiprocess folder;
4. **20 PNGs of 7000x7000 pixels** (the issue's 208 KB file, now refused from its header) and **20
   at the limit** (4096x4096, decoded): each worker's RSS before and after.

The client runs on the same machine as the server: on 2 cores the latencies are a floor. The load
average at start and end and the cores other processes kept busy are recorded: compare runs only
when those are low.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.guard import DEFAULT_GUARD_DIR  # noqa: E402
from paths_common import cpu_model  # noqa: E402  (bench/ is on sys.path when a script there runs)
from serve_load import Server, body, busy_cpu_seconds, git_state, other_busy_processes  # noqa: E402
from service.loader import NPY_MAX_HEADER, Settings, read_spec, resolve_source  # noqa: E402

TRUST = "/predict_with_trust"


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000 if seconds else np.array([float("nan")])
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)} | {"max_ms": float(ms.max())}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def multipart(name: str, filename: str | None, data: bytes) -> tuple[bytes, str]:
    boundary = "nadguardbenchboundary"
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    parts = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode() + data
    return parts + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hostile_bodies(settings: Settings, spec) -> dict[str, tuple[bytes, str]]:
    """The maximal body of each kind (module docstring, step 2), each within its media type's limit."""
    limits = settings.body_limits(spec)
    values = spec.channels * spec.height * spec.width
    number = "0.12345678901234567890"  # 22 characters with ", ": past what json.dumps writes for a float32

    def json_text(limit: int, prefix: str, suffix: str) -> bytes:
        image = "[" + ",".join(["[" + ",".join(["[" + ", ".join([number] * spec.width) + "]"] * spec.height) + "]"]
                               * spec.channels) + "]"
        n = (limit - len(prefix) - len(suffix)) // (len(image) + 2)
        assert n > settings.max_batch, "the limit no longer admits more images than the batch limit"
        return (prefix + "[" + ", ".join([image] * n) + "]" + suffix).encode()

    out = {"json": (json_text(limits["application/json"], '{"images": ', "}"), "application/json")}
    shape = (settings.max_batch, spec.channels, spec.height, spec.width)
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (NPY_MAX_HEADER - len(text) - 1) + "\n"  # a header of the largest length read
    head = b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text.encode("latin1")
    data = np.full(settings.max_batch * values, 0.5, np.float32)
    data[-1] = np.nan
    out["npy"] = (head + data.tobytes(), "application/x-npy")
    side = int(settings.max_image_pixels ** 0.5)  # grey noise: a PNG of about one byte a pixel, as many rows as fit
    rows = min(side, (limits["image"] - 65_536) // (side + 1))
    noise = np.random.default_rng(0).integers(0, 256, (rows, side), dtype=np.uint8)
    out["multipart_png"] = multipart("image", "max.png", png(noise))
    text = json_text(limits["images"] - 200, "", "")
    out["multipart_json"] = multipart("images", None, text)
    for kind, (data, media) in out.items():
        media_limit = limits[media.split(";")[0]]
        assert len(data) <= media_limit, (kind, len(data), media_limit)
    return out


def client(port: int, requests_: list[tuple[bytes, str]], stop: threading.Event, record: list) -> None:
    """POST ``requests_`` (cycled) to /predict_with_trust on one keep-alive connection until ``stop``;
    append ``(start, seconds, status or error)`` to ``record``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = 0
    while not stop.is_set():
        data, media = requests_[i % len(requests_)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", TRUST, body=data, headers={"Content-Type": media})
            r = conn.getresponse()
            r.read()
            outcome: int | str = r.status
            if r.getheader("connection", "").lower() == "close":
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            outcome = type(e).__name__
            conn.close()
        record.append((t0, time.perf_counter() - t0, outcome))
    conn.close()


def traffic(port: int, normal: list[tuple[bytes, str]], n_normal: int, hostile: dict[str, tuple[bytes, str]],
            seconds: float, server: Server) -> dict:
    stop = threading.Event()
    records: dict[str, list] = {"normal": []}
    threads = [threading.Thread(target=client, args=(port, normal[k:] + normal[:k], stop, records["normal"]))
               for k in range(n_normal)]
    for kind, req in hostile.items():
        records[kind] = []
        threads.append(threading.Thread(target=client, args=(port, [req], stop, records[kind])))
    me = psutil.Process()
    cpu0, srv0, busy0, rss0 = sum(me.cpu_times()[:2]), server.cpu_seconds(), busy_cpu_seconds(), server.rss_mb()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu, server_cpu = sum(me.cpu_times()[:2]) - cpu0, server.cpu_seconds() - srv0
    out = {"seconds": wall, "server_cores_busy": server_cpu / wall,
           "other_cores_busy": max(0.0, (busy_cpu_seconds() - busy0 - client_cpu - server_cpu) / wall),
           "server_rss_mb_before": rss0["total_mb"], "server_rss_mb_after": server.rss_mb()["total_mb"]}
    for kind, rec in records.items():
        statuses: dict[str, int] = {}
        for _, _, outcome in rec:
            statuses[str(outcome)] = statuses.get(str(outcome), 0) + 1
        ok = [s for _, s, o in rec if o == 200]
        out[kind] = {"requests": len(rec), "per_s": len(rec) / wall, "statuses": statuses,
                     "errors": len(rec) - len(ok) if kind == "normal" else None,
                     **percentiles([s for _, s, _ in rec])}
    return out


def metrics_scrape(port: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=300, headers={"Connection": "close"})
    return len(r.content), time.perf_counter() - t0


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def random_paths(port: int, home: Path) -> dict:
    rng = np.random.default_rng(17)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789-_.~")
    paths = ["/" + "".join(rng.choice(alphabet, 16)) for _ in range(900)]
    paths += ["/static_content/" + "".join(rng.choice(alphabet, 12)) for _ in range(50)]
    paths += [TRUST + "/" + "".join(rng.choice(alphabet, 8)) for _ in range(50)]
    before, before_s = metrics_scrape(port)
    folder0 = folder_bytes(home / "prometheus_multiproc_dir")
    statuses: dict[str, int] = {}
    with requests.Session() as s:
        for p in paths:
            code = str(s.get(f"http://127.0.0.1:{port}{p}", timeout=60).status_code)
            statuses[code] = statuses.get(code, 0) + 1
    after, after_s = metrics_scrape(port)
    return {"paths": len(paths), "statuses": statuses, "metrics_bytes_before": before, "metrics_bytes_after": after,
            "scrape_s_before": before_s, "scrape_s_after": after_s, "multiproc_folder_bytes_before": folder0,
            "multiproc_folder_bytes_after": folder_bytes(home / "prometheus_multiproc_dir")}


def huge_pngs(port: int, server: Server, settings: Settings) -> dict:
    pids = server.worker_pids()

    def rss() -> dict[str, float]:
        return {str(pid): psutil.Process(pid).memory_info().rss / 2**20 for pid in pids}

    def white(side: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGBA", (side, side), (255, 255, 255, 255)).save(buf, "PNG")
        return buf.getvalue()

    side = int(settings.max_image_pixels ** 0.5)
    out = {"rss_mb_start": rss()}
    for name, data in (("7000x7000", white(7000)), (f"{side}x{side}", white(side))):
        statuses: dict[str, int] = {}
        t0 = time.perf_counter()
        for _ in range(20):
            code = str(requests.post(f"http://127.0.0.1:{port}{TRUST}", files={"image": ("x.png", data)},
                                     timeout=300).status_code)
            statuses[code] = statuses.get(code, 0) + 1
        out[name] = {"file_bytes": len(data), "statuses": statuses, "seconds_per_upload": (time.perf_counter() - t0) / 20,
                     "rss_mb_after": rss()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each traffic phase (steps 1 and 2)")
    ap.add_argument("--normal", type=int, default=8, help="clients sending valid requests")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hostile_traffic"))
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    spec = read_spec(resolve_source())[0]
    import bentoml

    info = {"command": " ".join([".venv/bin/python bench/hostile_traffic.py", *(argv if argv is not None else sys.argv[1:])]),
            "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "load_average_start": os.getloadavg(), "other_busy_processes_start": other_busy_processes(),
            "python": platform.python_version(), "torch": torch.__version__, "bentoml": bentoml.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git": git_state(),
            "guard": os.environ.get("NAD_GUARD_DIR") or os.environ.get("NAD_GUARD_MODEL_TAG") or "bundled default",
            "body_limits": settings.body_limits(spec), "max_image_pixels": settings.max_image_pixels,
            "normal_clients": args.normal, "seconds_per_phase": args.seconds}
    x = load_dataset("mnist5k")[1].float(0, 256)
    normal = [(body(x[i:i + 1], "json"), "application/json") for i in range(8)]
    normal += [(body(x[i:i + 32], "npy"), "application/x-npy") for i in range(0, 256, 32)]
    normal = [r for pair in zip(normal[:8], normal[8:]) for r in pair]  # alternate: 1 image JSON, 32 images .npy
    hostile = hostile_bodies(settings, spec)
    info["hostile_body_bytes"] = {k: len(v[0]) for k, v in hostile.items()}
    summary: dict = {"info": info}
    with tempfile.TemporaryDirectory(prefix="nad-guard-hostile-") as home:
        server = Server(Path(home))
        try:
            info["server_workers"] = len(server.worker_pids())
            for data, media in normal:  # warm-up
                requests.post(f"http://127.0.0.1:{server.port}{TRUST}", data=data, headers={"Content-Type": media},
                              timeout=60)
            print("normal traffic alone ...", flush=True)
            summary["normal_alone"] = traffic(server.port, normal, args.normal, {}, args.seconds, server)
            print("normal traffic next to maximal bodies ...", flush=True)
            summary["with_hostile"] = traffic(server.port, normal, args.normal, hostile, args.seconds, server)
            print("random paths ...", flush=True)
            summary["random_paths"] = random_paths(server.port, Path(home))
            print("huge PNGs ...", flush=True)
            summary["huge_pngs"] = huge_pngs(server.port, server, settings)
        finally:
            server.stop()
    info["load_average_end"] = os.getloadavg()
    info["other_busy_processes_end"] = other_busy_processes()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict) -> str:
    i, a, b, rp, hp = s["info"], s["normal_alone"], s["with_hostile"], s["random_paths"], s["huge_pngs"]
    lim = i["body_limits"]
    lines = [
        "# The service under hostile traffic (`bench/hostile_traffic.py`)", "",
        f"Command: `{i['command']}` (from the repository root), started {i['started']}"
        f"{', at commit ' + i['git'] if i.get('git') else ''}; default settings, {i['server_workers']} serving "
        f"processes. Guard: {i['guard']}.", "",
        f"Machine: {i['cpu']}, {i['cores']} cores ({i['usable_cores']} usable); Python {i['python']}, torch "
        f"{i['torch']}, BentoML {i['bentoml']}. Load average (1/5/15 min) at start "
        f"{tuple(round(v, 2) for v in i['load_average_start'])}, at end {tuple(round(v, 2) for v in i['load_average_end'])} "
        f"(this benchmark's own client and server included); other processes at start: "
        f"{i['other_busy_processes_start']}; at end: {i['other_busy_processes_end']}. Client and server share the "
        "machine.", "",
        f"Body limits (bytes): .npy {lim['application/x-npy']:,}, JSON {lim['application/json']:,}, multipart "
        f"{lim['multipart/form-data']:,} (its parts: image {lim['image']:,}, images {lim['images']:,}, images_npy "
        f"{lim['images_npy']:,}); pixel limit {i['max_image_pixels']:,}.", "",
        "## Maximal bodies next to normal traffic", "",
        f"Normal traffic: {i['normal_clients']} clients sending valid requests to "
        f"`{TRUST}`, alternately 1 image as JSON and 32 images as `.npy`. Hostile clients, one per kind, sending "
        "back to back: " + ", ".join(f"`{k}` {v:,} bytes" for k, v in i["hostile_body_bytes"].items()) + ".", "",
        "| phase | seconds | valid requests | valid errors | valid p50 ms | p95 ms | p99 ms | max ms | server cores | "
        "other cores | server RSS MB before / after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in (("normal alone", a), ("next to maximal bodies", b)):
        n = p["normal"]
        lines.append(f"| {name} | {p['seconds']:.0f} | {n['requests']:,} | {n['errors']} | {n['p50_ms']:.0f} | "
                     f"{n['p95_ms']:.0f} | {n['p99_ms']:.0f} | {n['max_ms']:.0f} | {p['server_cores_busy']:.2f} | "
                     f"{p['other_cores_busy']:.2f} | {p['server_rss_mb_before']:,.0f} / {p['server_rss_mb_after']:,.0f} |")
    lines += ["", "Hostile clients' answers in the second phase:", "",
              "| kind | body bytes | requests | per s | answers | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for kind, size in i["hostile_body_bytes"].items():
        h = b[kind]
        lines.append(f"| `{kind}` | {size:,} | {h['requests']} | {h['per_s']:.1f} | "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(h["statuses"].items()))
                     + f" | {h['p50_ms']:.0f} | {h['p99_ms']:.0f} |")
    lines += ["", f"## {rp['paths']:,} random paths", "",
              "Answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(rp["statuses"].items())) + ".", "",
              "| | before | after |", "| --- | ---: | ---: |",
              f"| `/metrics` bytes | {rp['metrics_bytes_before']:,} | {rp['metrics_bytes_after']:,} |",
              f"| scrape seconds | {rp['scrape_s_before']:.3f} | {rp['scrape_s_after']:.3f} |",
              f"| Prometheus multiprocess folder bytes | {rp['multiproc_folder_bytes_before']:,} | "
              f"{rp['multiproc_folder_bytes_after']:,} |", "",
              "## 20 huge PNGs", "",
              "Each worker's RSS (MB) at the start and after each set of 20 uploads to "
              f"`{TRUST}` (white RGBA PNGs):", "",
              "| | file bytes | answers | s per upload | " + " | ".join(f"worker {k}" for k in hp["rss_mb_start"]) + " |",
              "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in hp["rss_mb_start"]) + " |",
              "| start | | | | " + " | ".join(f"{v:,.0f}" for v in hp["rss_mb_start"].values()) + " |"]
    for name, h in hp.items():
        if name == "rss_mb_start":
            continue
        lines.append(f"| after 20 of {name} | {h['file_bytes']:,} | "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(h["statuses"].items()))
                     + f" | {h['seconds_per_upload']:.2f} | " + " | ".join(f"{v:,.0f}" for v in h["rss_mb_after"].values())
                     + " |")
    growth = max(max(h["rss_mb_after"][k] for h in hp.values() if isinstance(h, dict) and "rss_mb_after" in h)
                 / v - 1 for k, v in hp["rss_mb_start"].items())
    lines += ["", f"Largest worker RSS growth over the start: {growth * 100:+.1f}% (target: within 10%).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
