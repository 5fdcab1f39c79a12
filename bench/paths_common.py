"""Shared helpers for the path benchmarks: machine description, load sampling, result files.

What a result may say about its run is :mod:`nad_guard.runinfo`'s: the CPU model, core count, versions,
the load average and this script's own command relative to the repository; never another process's
command line or name, never an absolute path of the machine."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nad_guard.runinfo import cpu_model, load_snapshot, portable_command, portable_path  # noqa: E402,F401

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(),
    }


def command_line() -> str:
    """This script's command, as run from the repository root with its virtual environment, paths made
    portable (:func:`nad_guard.runinfo.portable_command`)."""
    return portable_command(sys.argv, program=".venv/bin/python " + portable_path(sys.argv[0]))


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
