"""The report folder: :func:`write_report` writes ``index.html``, ``summary.json``, ``samples.csv``
(:func:`write_samples_csv`, columns :data:`CSV_COLUMNS`, then the per-layer ones, then per class-path source
``similar_rank:<source>``, the rank of the predicted class among the true class's most similar
(:mod:`nad_guard.audit.class_paths`), then, for a guard with an error detector, :data:`TWO_DETECTOR_COLUMNS`)
and the PNG figures; ``explanations.json`` holds every misprediction's path and deciding filters
(:mod:`nad_guard.audit.explain`), least trusted first."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from nad_guard.audit.claims import EXPLANATIONS_FILE, csv_columns, csv_values, explanation_rows
from nad_guard.audit.figures import write_figures
from nad_guard.audit.html import render_html
from nad_guard.audit.records import AuditResult

CLEAN = "clean"

CSV_COLUMNS = ("index", "input", "split_part", "true", "true_name", "pred", "pred_name", "correct", "confidence",
               "trust_score", "suspicion_score", "flagged", "nearest_path_class", "nearest_path_class_name",
               "true_class_path_rank", "classifier_true_rank")
TWO_DETECTOR_COLUMNS = ("attack_p_value", "error_p_value")  # after the per-layer columns, two-detector guards only


def write_samples_csv(result: AuditResult, path: str | Path) -> Path:
    """One row per audited input (clean images first, then each attack's adversarial examples)."""
    path = Path(path)
    names = result.class_names
    two = result.clean.error_trust is not None  # a guard with an error detector: both p-values, last
    header = list(CSV_COLUMNS) + [f"divergence:{l}" for l in result.layers] + \
        [f"nearest_class:{l}" for l in result.layers] + csv_columns(result) + \
        (list(TWO_DETECTOR_COLUMNS) if two else [])
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for kind, s in [(CLEAN, result.clean), *result.adversarial.items()]:
            extra = csv_values(result, s)
            for i in range(len(s)):
                y, p, npc = int(s.label[i]), int(s.pred[i]), int(s.nearest_path[i])
                w.writerow([int(s.position[i]), kind, s.part[i], y, names[y], p, names[p], int(y == p),
                            repr(float(s.confidence[i])), repr(float(s.trust[i])), repr(float(s.score[i])),
                            int(s.flag[i]), npc, names[npc], int(s.true_path_rank[i]), int(s.clf_true_rank[i]),
                            *(repr(float(v)) for v in s.divergence[i]), *(int(v) for v in s.layer_nearest[i]),
                            *(col[i] for col in extra),
                            *((repr(float(s.attack_trust[i])), repr(float(s.error_trust[i]))) if two else ())])
    return path


def write_report(result: AuditResult, out_dir: str | Path, *, command: str | None = None,
                 machine: dict[str, Any] | None = None, timings: dict[str, float] | None = None,
                 dpi: int = 90) -> dict[str, Path]:
    """Write ``index.html``, ``summary.json``, ``samples.csv`` and the PNG figures into ``out_dir``.

    ``command`` is recorded in the report (default: the Python API); ``timings`` (e.g. the CLI's load
    time) are added to the audit's own. Returns the written paths by name.
    """
    from nad_guard.runinfo import machine_info
    from nad_guard.metrics import write_json

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = write_figures(result, out, dpi)
    files = {"samples.csv": write_samples_csv(result, out / "samples.csv")}
    if result.explanations is not None:  # compact: thousands of rows (nad_guard.audit.explain defines each field)
        files[EXPLANATIONS_FILE] = out / EXPLANATIONS_FILE
        rows = {"layers": result.layers, "classes": result.class_names, "rows": explanation_rows(result)}
        files[EXPLANATIONS_FILE].write_text(json.dumps(rows, separators=(",", ":")) + "\n")
    tim = {**result.timings, **(timings or {})}
    tim["report_s"] = round(time.perf_counter() - t0, 3)
    if "load_s" in tim:
        tim["total_s"] = round(tim["load_s"] + tim["audit_s"] + tim["report_s"], 3)
        tim["total_without_attacks_s"] = round(tim["total_s"] - tim.get("attacks_s", 0.0), 3)
    summary = {"command": command or "nad_guard.audit.run_audit (Python API)", "config": result.config,
               "machine": machine or machine_info(), "timings": tim, "figures": [f.name for f in figs.values()],
               **result.summary}
    files["summary.json"] = write_json(out / "summary.json", summary)
    files["index.html"] = out / "index.html"
    files["index.html"].write_text(render_html(result, summary, figs))
    return {**files, **{f"figure:{k}": v for k, v in figs.items()}}
