"""Shared helpers for the path benchmarks: machine description, load sampling, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def other_processes(limit: int = 5) -> list[str]:
    """The busiest processes other than this one (``ps``), for honest load notes."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,comm,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    me = str(os.getpid())
    rows = [" ".join(r.split())[:140] for r in out if r.split()[0] != me]
    return rows[:limit]


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_snapshot() -> dict[str, Any]:
    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": list(os.getloadavg()),
            "busiest_other_processes": other_processes()}


def command_line() -> str:
    return "/work/main/.venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)


def append_record(name: str, record: dict[str, Any]) -> Path:
    """Append ``record`` to ``bench/results/<name>.json`` (a list of runs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append(record)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return path


def read_records(name: str) -> list[dict[str, Any]]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)
