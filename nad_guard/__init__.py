"""nad-guard: a trust layer for image classifiers.

The public API, importable from the package itself::

    from nad_guard import DEFAULT_GUARD_DIR, Guard, load_dataset

    guard = Guard.load(DEFAULT_GUARD_DIR)
    _, test = load_dataset("mnist5k")
    records = guard.predict(test.float(0, 4))

Everything in :data:`__all__` is public and kept stable; names reached only through a submodule are
implementation. The names are loaded on first use (PEP 562), so ``import nad_guard`` stays cheap and a
command line that needs one of them does not import torch, torchattacks and scikit-learn for its ``--help``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    # classifiers
    "Classifier": "models", "InputSpec": "models", "from_module": "models", "load_reference": "models",
    "torchvision_classifier": "models", "REFERENCE_MODELS": "models",
    "build_classifier": "model_names", "load_torchscript": "model_names", "classifier_from_factory": "model_names",
    # data
    "ImageSet": "data", "load_dataset": "data", "DATASETS": "data",
    # paths (per-class sub-architectures, each input's path)
    "PathModel": "paths", "PathFeatures": "paths", "GatePoint": "paths", "find_gate_points": "paths",
    "discover_gate_points": "paths", "GateDiscovery": "paths", "GateCoverageWarning": "paths", "ArtifactError": "paths",
    # detection and trust
    "PathDetector": "detectors", "load_detector": "detectors", "save_detector": "detectors",
    "fit_guard": "fitting", "holdout_splits": "holdout", "holdout_provenance": "holdout",
    "CalibrationWarning": "calibration", "CalibrationError": "calibration", "FPRGuarantee": "calibration",
    "fpr_guarantee": "calibration",
    # the guard
    "Guard": "guard", "GuardResult": "guard", "DEFAULT_GUARD_DIR": "guard",
    # attacks, evaluation, audit
    "get_suite": "attacks", "generate": "attacks",
    "EvalConfig": "evaluate", "run_evaluation": "evaluate",
    "run_audit": "audit", "write_report": "audit",
}

__all__ = sorted(_PUBLIC, key=str.lower) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nad_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nad_guard.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
