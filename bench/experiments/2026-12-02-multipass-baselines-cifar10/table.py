"""Tables of this experiment from its results.json: AUROC (TPR at the calibrated 5% FPR) per attack for the
rows that answer its question, and what the Odds' fixed rule (z > 3.09) flags. Run from the repository root:
python bench/experiments/2026-12-02-multipass-baselines-cifar10/table.py"""

import json
from pathlib import Path

HERE = Path(__file__).parent
r = json.loads((HERE / "results.json").read_text())
rows = r["rows"]
attacks = list(dict.fromkeys(x["attack"] for x in rows))
WANT = {"seen": ["nad-guard", "nad-guard[logistic,rich+subnet]", "mahalanobis-lr", "msp", "feature-squeezing", "odds"],
        "clean-only": ["nad-guard", "nad-guard[gaussian,rich]", "nad-guard[gaussian,rich+subnet]", "mahalanobis", "msp",
                       "energy", "feature-squeezing", "odds"]}
for protocol, dets in WANT.items():
    print(f"\n{protocol}: AUROC (TPR at the calibrated 5% FPR)\n")
    print("| detector | " + " | ".join(attacks) + " | mean AUROC |")
    print("|---" * (len(attacks) + 2) + "|")
    for det in dets:
        got = {x["attack"]: x for x in rows if x["protocol"] == protocol and x["detector"] == det}
        if not got:
            continue
        cells = [f"{got[a]['auroc']:.3f} ({got[a]['tpr']:.2f})" if a in got else "-" for a in attacks]
        mean = sum(got[a]["auroc"] for a in got) / len(got)
        print(f"| {det} | " + " | ".join(cells) + f" | {mean:.3f} |")
print("\nodds, the paper's rule (z > 3.09): share flagged\n")
print("| attack | evaluation clean | calibration clean | adversarial |")
print("|---|---|---|---|")
for x in rows:
    if x["protocol"] == "clean-only" and x["detector"] == "odds":
        p = x["paper_rule"]
        print(f"| {x['attack']} | {p['flagged_clean']:.3f} | {p['flagged_cal']:.3f} | {p['flagged_adv']:.3f} |")
m = r["machine"]
print(f"\nmachine: {m['start']['cpu']}, {m['start']['cores']} cores, load average {m['start']['load_average']} -> "
      f"{m['end']['load_average']}; {r['seconds']:.0f} s; timings {r['timings']}")
print(f"data: {r['data']}")
print(f"attacks: { {s: {a: (v['n_success'] if 'n_success' in v else v) for a, v in d.items()} for s, d in r['attacks'].items()} }")
