"""What a run's result becomes: per-protocol summaries (:func:`summarize`), ``results.md`` tables
(:func:`render_markdown`), ``results.json`` and ROC plots (:func:`write_outputs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nad_guard.calibration import fpr_guarantee as calibration_guarantee
from nad_guard.evaluate.config import NOISY_NEGATIVE_PROTOCOLS, clean_spec
from nad_guard.metrics import aurc, markdown_table, plot_roc, risk_coverage, write_json


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per protocol: mean / min AUROC and mean TPR per detector, nad-guard's mean and the best baseline's."""
    out: dict[str, Any] = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        per: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["protocol"] == protocol:
                per.setdefault(r["detector"], []).append(r)
        dets = {k: {"mean_auroc": float(np.mean([r["auroc"] for r in v])),
                    "min_auroc": float(np.min([r["auroc"] for r in v])),
                    "mean_tpr": float(np.mean([r["tpr"] for r in v])), "n": len(v)} for k, v in per.items()}
        base = {k: v for k, v in dets.items() if not k.startswith("nad-guard")}
        best = max(base, key=lambda k: base[k]["mean_auroc"]) if base else None
        out[protocol] = {"detectors": dets, "nad_guard_mean_auroc": dets.get("nad-guard", {}).get("mean_auroc"),
                         "best_baseline": best, "best_baseline_mean_auroc": base[best]["mean_auroc"] if best else None}
    return out


def _pivot(rows: Sequence[dict[str, Any]], protocol: str, metric: str) -> str:
    rs = [r for r in rows if r["protocol"] == protocol]
    attacks = list(dict.fromkeys(r["attack"] for r in rs))
    table = []
    for det in dict.fromkeys(r["detector"] for r in rs):
        row: dict[str, Any] = {"detector": det}
        vals = []
        for r in rs:
            if r["detector"] == det:
                row[r["attack"]] = r[metric]
                vals.append(r[metric])
        if len(attacks) > 1:
            row["mean"] = float(np.mean(vals))
        table.append(row)
    return markdown_table(table, ["detector", *attacks, *(["mean"] if len(attacks) > 1 else [])])


def write_outputs(result: dict[str, Any], out: str | Path, command: str | None = None) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` and ``roc_<protocol>.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = result.get("scores", {})
    files: dict[str, Path] = {}
    for protocol, per_attack in scores.items():
        if not per_attack:
            continue
        # nad-guard per attack, and every detector on one attack (pgd when present)
        curves = {a: (s["nad-guard"]["clean"], s["nad-guard"]["adv"]) for a, s in per_attack.items() if "nad-guard" in s}
        focus = "pgd" if "pgd" in per_attack else next(iter(per_attack))
        if len(curves) > 1:
            files[f"roc_{protocol}"] = plot_roc(curves, out / f"roc_{protocol}.png",
                                                title=f"nad-guard, {protocol} protocol")
        files[f"roc_{protocol}_{focus}"] = plot_roc(
            {k: (v["clean"], v["adv"]) for k, v in per_attack[focus].items()},
            out / f"roc_{protocol}_{focus}.png", title=f"{protocol}: {focus}")
    mis = (scores.get("mispredictions") or {}).get("mispredictions") or {}  # protocol -> its one "attack"
    curves = {k: mis[k] for k in ("msp", "doctor", "nad-guard[error-detector]", "nad-guard") if k in mis}
    if curves:
        files["risk_coverage"] = plot_risk_coverage(curves, out / "risk_coverage_mispredictions.png")
    js = {k: v for k, v in result.items() if k != "scores"}
    if command:
        js["command"] = command
    files["json"] = write_json(out / "results.json", js)
    files["md"] = out / "results.md"
    files["md"].write_text(render_markdown(js))
    return files


def _oracle_aurc(n_ok: int, n_wrong: int) -> float:
    """The AURC of a perfect ranking (every error more suspicious than every correct image)."""
    return aurc(np.r_[np.zeros(n_ok), np.ones(n_wrong)], np.r_[np.zeros(n_ok), np.ones(n_wrong)])


def plot_risk_coverage(curves: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Risk-coverage curves (:func:`nad_guard.metrics.risk_coverage`) of the detectors' scores on correct
    (``clean``) and mispredicted (``adv``) images, with each one's AURC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, s in curves.items():
        sc = np.r_[s["clean"], s["adv"]]
        err = np.r_[np.zeros(len(s["clean"])), np.ones(len(s["adv"]))]
        cov, risk = risk_coverage(sc, err)
        ax.plot(cov, risk, label=f"{name} (AURC {aurc(sc, err):.4f})")
    ax.set(xlabel="coverage (share of predictions kept)", ylabel="risk (error rate among kept)",
           title="mispredictions: risk-coverage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _who(cfg: dict[str, Any]) -> str:
    m, e = cfg["primary"]
    if cfg.get("select", "fixed") == "cv":
        return (f"per training task, the best of {', '.join(cfg['methods'])} x {', '.join(cfg['encodings'])} encodings by "
                f"{cfg['cv_folds']}-fold cross-validation on the fit part")
    return f"{m} on the '{e}' encoding"


def _clean_who(cfg: dict[str, Any]) -> str:
    method, enc = clean_spec(cfg["clean_methods"][0], cfg["primary"][1])
    return f"{method} on the '{enc}' encoding"


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]["start"]
    lines = [f"# Detection evaluation: {r['model']} on {r['data']['test']} (suite {r['config']['suite']})", ""]
    if r.get("command"):
        lines += ["Command:", "", "```", r["command"], "```", ""]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}; load average at "
              f"start {m['load_average']}, at end {r['machine']['end']['load_average']} (other jobs share the "
              f"cores). Run time {r['seconds']:.0f} s (timings: {r['timings']}).", ""]
    dd = r["data"]
    lines += [f"Splits of the {dd['test_images']} test images: detector-fit {dd['fit_images']} "
              f"({dd['fit_clean']} correct), calibration {dd['calibration_images']} ({dd['calibration_clean']} correct, "
              f"thresholds at {r['config']['fpr']:.0%} FPR), evaluation {dd['evaluation_images']} "
              f"({dd['evaluation_clean']} correct, {dd['evaluation_mispredicted']} mispredicted). Baselines' "
              f"unsupervised parts: {dd['baseline_train_images']} training images. nad-guard = {_who(r['config'])} "
              f"(clean-only: {_clean_who(r['config'])}). "
              f"Bootstrap: {r['config']['n_resamples']} stratified resamples, "
              "95% percentile intervals.", ""]
    noisy = r["config"].get("noisy_negatives")
    if noisy:
        n = dd["negatives"]
        ps = [p for p in r["config"]["protocols"] if p in NOISY_NEGATIVE_PROTOCOLS] or list(NOISY_NEGATIVE_PROTOCOLS)
        lines += [f"**Noisy negatives** (`--noisy-negatives {','.join(noisy)}`, as Lee et al. 2018 count their noisy "
                  f"images): in the {', '.join(ps)} protocols the negatives are each part's "
                  f"clean images and their noisy copies ({', '.join(noisy)}): fit {n['fit']}, calibration "
                  f"{n['calibration']}, evaluation {n['evaluation']} images. Every supervised detector is fitted with "
                  "the fit part's noisy copies as label 0, the thresholds are set on the calibration part's clean "
                  "and noisy images (the guarantee below counts its clean images only: a noisy copy is not an "
                  "independent draw), and every row's AUROC and TPR count the evaluation part's noisy copies with "
                  "its clean images; the controls are not scored as attacks. The other protocols keep clean "
                  "negatives.", ""]
    cal = r.get("calibration")
    if cal:
        g = calibration_guarantee(cal["n"], cal["fpr"])
        lines += [f"Every threshold (the TPR columns, `test_fpr`) is set by the rule the deployed guard uses "
                  f"(`nad_guard.calibration`): {g.summary()}." + (f" **{g.warning}.**" if g.warning else ""), ""]
    prov = r.get("provenance")
    if prov:
        lines += [f"Holdout parts (seed {prov['seed']}, recorded by content hash): split {prov['split_name']} sha256 "
                  f"{prov['split_sha256'][:12]}, "
                  + ", ".join(f"{k} {v['images']} images sha256 {v['sha256'][:12]}" for k, v in prov["parts"].items())
                  + "." + (f" Against the artifact's guard: {prov['guard']['note']}." if "guard" in prov else ""), ""]
    lines += ["## Attacks (successful ones only are kept)", ""]
    rows = []
    for split, res in r["attacks"].items():
        for a, s in res.items():
            rows.append({"split": split, "attack": a, "attacked": s["n_correct"], "success rate": s["success_rate"],
                         "kept": s["n_kept"], "mean L-inf": s["mean_linf"], "mean L2": s["mean_l2"],
                         "seconds": s["seconds"]})
    lines += [markdown_table(rows), ""]
    srows = []
    for p, s in r["summary"].items():
        nad = s["detectors"].get("nad-guard", {})
        srows.append({"protocol": p, "nad-guard mean AUROC": s["nad_guard_mean_auroc"],
                      "nad-guard min AUROC": nad.get("min_auroc"), "nad-guard mean TPR@5%": nad.get("mean_tpr"),
                      "best baseline": s["best_baseline"], "its mean AUROC": s["best_baseline_mean_auroc"],
                      "its mean TPR@5%": s["detectors"].get(s["best_baseline"], {}).get("mean_tpr")})
    if srows:  # none when only the adaptive protocol ran
        lines += ["## Summary: mean AUROC per protocol", "", markdown_table(srows), ""]
    chosen = [{"protocol": x["protocol"], "attack": x["attack"], "trained on": x["trained_on"],
               "folds by": x["cv"]["folds_by"], "selected": x["selected"],
               **{f"CV {k}": v for k, v in x["cv"]["auroc"].items()}}
              for x in r["rows"] if x["detector"] == "nad-guard" and x.get("cv")]
    if chosen:
        lines += ["## nad-guard's detector per training task", "",
                  f"Chosen by {r['config']['cv_folds']}-fold cross-validated AUROC on the task's training data (the "
                  "fit part), before anything is scored on the evaluation part. Folds are stratified and grouped: "
                  "by attack when the task trains on at least as many attacks (or kinds of error) as there are "
                  "folds (each fold holds out whole attacks), else by source image (an image and its "
                  "adversarials stay on one side).", "", markdown_table(chosen), ""]
    for p in (p for p in r["summary"] if p != "deployed"):
        lines += [f"## {p}: AUROC", "", _pivot(r["rows"], p, "auroc"), f"## {p}: TPR at 5% FPR "
                  "(threshold from the calibration part)", "", _pivot(r["rows"], p, "tpr")]
    mis = [x for x in r["rows"] if x["protocol"] == "mispredictions" and x.get("aurc") is not None]
    if mis:
        n_ok, n_wrong = mis[0]["n_clean"], mis[0]["n_suspicious"]
        lines += ["## mispredictions: risk-coverage (AURC)", "",
                  f"The evaluation part's {n_ok + n_wrong} images ({n_wrong} mispredicted) kept from the least to the "
                  "most suspicious score; AURC is the error rate among the kept images averaged over every coverage "
                  f"(lower is better; a perfect ranking {_oracle_aurc(n_ok, n_wrong):.4f}, a random one "
                  f"{n_wrong / (n_ok + n_wrong):.4f}). Curves: `risk_coverage_mispredictions.png`.", "",
                  markdown_table([{"detector": x["detector"], "AURC": x["aurc"], "AUROC": x["auroc"],
                                   **({"selected": x["selected"]} if x.get("selected") else {})} for x in mis],
                                 ["detector", "AURC", "AUROC", "selected"]), ""]
        cvs = [x for x in mis if x["detector"] == "nad-guard[error-detector]"]
        if cvs:
            lines += ["The error detector's method, chosen by cross-validated AUROC on the fit part's correct and "
                      "mispredicted images only: " + ", ".join(f"{k} {v:.3f}" for k, v in cvs[0]["cv"]["auroc"].items())
                      + f"; selected `{cvs[0]['selected']}`.", ""]
    if r.get("deployed"):
        lines += _deployed_section(r)
    if r.get("adaptive"):
        lines += _adaptive_section(r["adaptive"])
    if r["rows"]:
        lines += ["## All rows (with 95% bootstrap intervals)", ""]
        cols = ["protocol", "detector", "attack", "trained_on", "auroc", "auroc_ci", "aupr", "aupr_ci", "tpr", "tpr_ci",
                "test_fpr", "n_clean", "n_suspicious"]
        lines += [markdown_table(r["rows"], cols)]
    return "\n".join(lines)


def _deployed_section(r: dict[str, Any]) -> list[str]:
    """The shipped guard's table: per attack, AUROC, the share flagged at the deployed thresholds and the
    observed false-positive rate on the evaluation part's correct images."""
    from nad_guard.evaluate.deployed import DEPLOYED, DEPLOYED_ATTACK, DEPLOYED_DEEP

    info = r["deployed"]
    a = info["attack_detector"]
    rows = [x for x in r["rows"] if x["protocol"] == "deployed"]
    guard = (f"two detectors: the attack detector ({a['method']}, {a['encoding']}) at {a['fpr']:.2%} FPR and the "
             f"error detector ({info['error_detector']['method']}) at {info['error_detector']['fpr']:.2%}, an input "
             "flagged when either flags it" if info["two_detectors"] else
             f"one detector ({a['method']}, {a['encoding']}, trained on every attack and the mispredictions) at "
             f"{a['fpr']:.2%} FPR")
    fpr = next((x for x in rows if x["detector"] == DEPLOYED), {})
    lines = ["## deployed: the guard `fit-detector` ships, at its thresholds", "",
             f"The guard fitted on the fit part as `nad-guard fit-detector` does ({guard}), calibrated on the "
             "calibration part, scored on the evaluation part. Flagged = the guard's decision at its deployed "
             f"thresholds. Observed false-positive rate on the {fpr.get('n_clean')} correct evaluation images: "
             f"**{fpr.get('test_fpr', float('nan')):.1%}** (95% CI {fpr.get('test_fpr_ci', [float('nan')] * 2)[0]:.1%}-"
             f"{fpr.get('test_fpr_ci', [float('nan')] * 2)[1]:.1%}; asked: {r['config']['fpr']:.0%}). Baselines: "
             f"threshold at {r['config']['fpr']:.0%} FPR on the calibration part.", ""]
    deep = DEPLOYED_DEEP.format(r["config"].get("probes", 0)) if info.get("deep_detector") else None
    if deep:
        dr = next((x for x in rows if x["detector"] == deep), {})
        lines[-2] += (f" Deep mode (`--probes {r['config']['probes']}`: the deep detector in the attack detector's "
                      f"place, same error detector): observed false-positive rate **{dr.get('test_fpr', float('nan')):.1%}**.")
    short_names = {DEPLOYED: "guard", DEPLOYED_ATTACK: "attack det.", **({deep: "deep guard"} if deep else {})}
    table = []
    for attack in dict.fromkeys(x["attack"] for x in rows):
        row: dict[str, Any] = {"attack": attack}
        for x in rows:
            if x["attack"] == attack and x["detector"] in (*short_names, "msp", "doctor"):
                short = short_names.get(x["detector"], x["detector"])
                row[f"{short} AUROC"] = x["auroc"]
                row[f"{short} flagged"] = x["tpr"]
        table.append(row)
    return lines + [markdown_table(table), ""]


def _adaptive_section(a: dict[str, Any]) -> list[str]:
    """The adaptive attack's table: per defence, the share that evades at the suite's budget, plain PGD's
    share, the budget for 50% evasion and the evasion curve over the grid."""
    grid = ", ".join(f"{e * 255:.3g}/255" for e in a["eps_grid"])
    lines = ["## Adaptive white-box attack", "",
             f"L-inf PGD with a random start, {a['steps']} steps of {a['step_rule']}, on {a['images']} correctly "
             f"classified evaluation images, at each budget of the grid ({grid}); objectives {a['objectives']} "
             f"(classifier margin clamped at -{a['kappa']}, plus lambda x the detector's surrogate score centred at "
             f"its threshold, `nad_guard.attacks.adaptive`), EOT over {a['eot']} draws per step for random "
             "defences. 'Evades' = some iterate is misclassified and not flagged by the defence's real decision at "
             "its calibrated threshold, for some objective (the share of attacked images; lower is better for the "
             f"defender). 50% budget: {a['budget_rule']}.", ""]
    rows = []
    for k, v in a["detectors"].items():
        b50 = v["budget_50"]
        rows.append({"defence": k, f"evades at {a['eps'] * 255:.3g}/255": v["adaptive_evades"],
                     "plain PGD evades": v["plain_pgd_evades"],
                     "50% budget (/255)": f"{b50 * 255:.2f}" if b50 is not None else f"> {a['eps_grid'][-1] * 255:.3g}",
                     **{f"{float(e) * 255:.3g}/255": x for e, x in v["curve"].items()},
                     "seconds": v["seconds"]})
    lines += [markdown_table(rows), ""]
    lines += ["Surrogates: " + "; ".join(f"{k}: {v['surrogate']}" for k, v in a["detectors"].items()) + ".", ""]
    return lines
