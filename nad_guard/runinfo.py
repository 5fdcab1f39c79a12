"""What a result file may say about the run that made it: only the project's own facts.

The CPU model, core count, torch threads and versions, the load average, and the command that ran,
with every path that lies inside the repository written relative to it and any other absolute path
replaced by a placeholder (:func:`portable_path`). Never another process's command line or name (a
command line can carry anything, credentials included) and never an absolute path of the machine.
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = "<outside-repo>"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :func:`platform.processor` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, versions and the load average at the time of the call."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": load_average(), "python": platform.python_version(), "torch": torch.__version__}


def load_snapshot() -> dict[str, Any]:
    """The time (UTC) and the load average: how busy the machine was, without saying who made it busy."""
    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": load_average()}


def _cache_root() -> Path | None:
    from nad_guard.data import cache_dir

    try:
        return cache_dir().resolve()
    except OSError:
        return None


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a result file may record it: as given when relative; relative to the repository when
    inside it; ``$NAD_GUARD_CACHE/...`` inside the cache directory; else ``<outside-repo>/<name>``."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if not p.is_absolute():
        return text
    p = Path(os.path.normpath(p))  # not resolve(): a link's own name is what was given
    for root, label in ((REPO_ROOT, None), (_cache_root(), "$NAD_GUARD_CACHE")):
        if root is not None and (p == root or root in p.parents):
            rel = p.relative_to(root).as_posix()
            return (rel or ".") if label is None else f"{label}/{rel}" if rel != "." else label
    return f"{OUTSIDE}/{p.name}"


def portable_arg(arg: str) -> str:
    """A command-line argument with an absolute path in it (``/x/y`` or ``--opt=/x/y``) made portable."""
    if arg.startswith(("/", "~")):
        return portable_path(arg)
    key, eq, value = arg.partition("=")
    if eq and key.startswith("-") and value.startswith(("/", "~")):
        return f"{key}={portable_path(value)}"
    return arg


def portable_command(argv: Sequence[str], program: str | None = None) -> str:
    """The command line ``argv`` (``program`` replacing ``argv[0]`` when given) with every absolute
    path made portable (:func:`portable_arg`), shell-quoted."""
    args = list(argv)
    head = [program] if program is not None else ([portable_arg(args[0])] if args else [])
    return " ".join(head + [shlex.quote(portable_arg(a)) for a in args[1:]])


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls (the bench scripts' timer)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
