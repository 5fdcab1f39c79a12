"""The README's tables from eval/results.json and cost.json: nad-guard single-pass against its deep check,
per protocol and attack (AUROC, TPR at the calibrated 5% threshold), and the issue's targets.

    python bench/experiments/2026-12-02-deep-check-cifar10/table.py"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DEEP = "nad-guard[deep k=4]"


def main() -> None:
    r = json.loads((HERE / "eval" / "results.json").read_text())
    rows = r["rows"]
    protocols = list(dict.fromkeys(x["protocol"] for x in rows))
    attacks = list(dict.fromkeys(x["attack"] for x in rows if x["protocol"] == "seen"))
    print("| protocol | detector | " + " | ".join(attacks) + " | mean | min | mean TPR@5% |")
    print("| --- | --- |" + " ---: |" * (len(attacks) + 3))
    summ = {}
    for p in protocols:
        best = r["summary"][p]["best_baseline"]
        for det in ("nad-guard", DEEP, best):
            rs = {x["attack"]: x for x in rows if x["protocol"] == p and x["detector"] == det}
            if not rs:
                continue
            au = [rs[a]["auroc"] for a in rs]
            tp = [rs[a]["tpr"] for a in rs]
            summ[(p, det)] = (float(np.mean(au)), float(np.min(au)), float(np.mean(tp)))
            cells = [f"{rs[a]['auroc']:.3f}" if a in rs else "" for a in attacks] if p != "mispredictions" else \
                [f"{au[0]:.3f} (mispredictions)"] + [""] * (len(attacks) - 1)
            print(f"| {p} | {det} | " + " | ".join(cells) + f" | {np.mean(au):.3f} | {np.min(au):.3f} | {np.mean(tp):.3f} |")
    print()
    s, u, c = (summ.get((p, DEEP)) for p in ("seen", "unseen", "clean-only"))
    seen_rows = [x for x in rows if x["protocol"] == "seen" and x["detector"] == DEEP]
    print("| target (deep check) | measured | met |")
    print("| --- | --- | --- |")
    below = ", ".join(f"{x['attack']} {x['auroc']:.3f}" for x in seen_rows if x["auroc"] < 0.97) or "none"
    print(f"| seen >= 0.97 on every attack | min {s[1]:.3f} (mean {s[0]:.3f}; below: {below}) | "
          f"{'yes' if s[1] >= 0.97 else 'no'} |")
    print(f"| leave-one-out mean >= 0.95, none < 0.90 | mean {u[0]:.3f}, min {u[1]:.3f} | "
          f"{'yes' if u[0] >= 0.95 and u[1] >= 0.90 else 'no'} |")
    print(f"| clean-only >= 0.90 | mean {c[0]:.3f} (min {c[1]:.3f}) | {'yes' if c[0] >= 0.90 else 'no'} |")
    print(f"| mean TPR at 5% FPR >= 0.90 | seen {s[2]:.3f}, unseen {u[2]:.3f}, clean-only {c[2]:.3f} | "
          f"{'yes' if min(s[2], u[2], c[2]) >= 0.90 else 'no'} |")
    t = r["timings"]
    print(f"\nTimings (s): {json.dumps(t)}")
    cost = HERE / "cost.json"
    if cost.exists():
        cj = json.loads(cost.read_text())
        print("\n| batch | plain forward (s) | single-pass features | deep k=4 | deep k=8 | deep k=16 | "
              "k=4 / 8 / 16 in passes <= 256 rows | target k+1.2 |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for row in cj["rows"]:
            chunk = " / ".join("%.2fx" % row[f"deep_k{k}_passes256_x"] for k in (4, 8, 16)
                               if f"deep_k{k}_passes256_x" in row) or "-"
            deep = " | ".join("%.2fx" % row[f"deep_k{k}_x"] for k in (4, 8, 16))
            print(f"| {row['batch']} | {row['plain_forward_s']:.4f} | {row['single_pass_x']:.2f}x | {deep} | {chunk} "
                  "| 5.2 / 9.2 / 17.2 |")
        print(f"\nload average: start {cj['machine']['start'].get('load_average')}, end "
              f"{cj['machine']['end'].get('load_average')}")


if __name__ == "__main__":
    main()
