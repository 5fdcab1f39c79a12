"""Put a guard directory into the BentoML model store, so the service can load it by tag.

    python -m service.store GUARD_DIR [--name nad-guard]
    NAD_GUARD_MODEL_TAG=nad-guard:latest bentoml serve service.service:NadGuard

The guard is validated (loaded once) before it is stored; the stored model is the directory's files
as they are, with the classifier name, classes, detector method and threshold as metadata.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from service.loader import GuardSource, load_guard, read_spec


def save_to_store(guard_dir: str | Path, name: str = "nad-guard") -> str:
    """Copy a valid guard directory into the model store; returns the new tag (``name:version``)."""
    import bentoml

    guard_dir = Path(guard_dir).resolve()
    source = GuardSource("dir", str(guard_dir), guard_dir)
    load_guard(source)  # refuse to store something the service cannot load
    spec, det = read_spec(source)
    metadata = {"classes": len(spec.class_names), "input_shape": list(spec.shape),
                "detector_method": str(det.get("method")), "threshold": float(det.get("threshold", "nan"))}
    with bentoml.models.create(name, module="nad_guard", labels={"kind": "nad-guard"},
                               metadata=metadata) as model:
        for item in guard_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(model.path) / item.name)
    return str(model.tag)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m service.store", description=__doc__.split("\n\n")[0])
    ap.add_argument("guard_dir", help="guard directory written by `nad-guard fit-detector`")
    ap.add_argument("--name", default="nad-guard", help="model name in the store (default: nad-guard)")
    args = ap.parse_args(argv)
    print(save_to_store(args.guard_dir, args.name))


if __name__ == "__main__":
    main()
