"""The report of experiments/structured_experiment.py: tables, MAPSSWE, results JSON, figures.

Every WER is pooled over dev + test (the built-in corpus's seen voices) unless marked
test-unseen; mean ± s.d. over the seeds that finished; MAPSSWE at alpha 0.05, per seed,
between a method and its baseline of the same shape (+ the first significantly better,
- significantly worse, = no significant difference).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from reporting import POOLED, add_holm, mean_sd, pooled_decoding, rounded

from spg.wer import error_counts, mapsswe


def wers(decoding: dict) -> dict:
    """{"pooled": dev+test WER, "test-unseen": WER} of one decoding."""
    unseen = decoding["test-unseen"]
    return {"pooled": error_counts(*pooled_decoding(decoding)).rate,
            "test-unseen": error_counts(unseen["references"], unseen["hypotheses"]).rate}


def compare(first: dict, second: dict) -> dict:
    """MAPSSWE of `first` against `second` (two decodings of the same utterances), pooled and
    on test-unseen: p, significant, whether `first` has fewer errors."""
    figures = {}
    references, hypotheses = pooled_decoding(first)
    for name, (refs, a, b) in {"pooled": (references, hypotheses, pooled_decoding(second)[1]),
                               "test-unseen": (first["test-unseen"]["references"], first["test-unseen"]["hypotheses"],
                                               second["test-unseen"]["hypotheses"])}.items():
        test = mapsswe(refs, a, b, alpha=0.05)
        figures[name] = {"p": test.p_value, "significant": test.significant, "first_better": test.mean_difference < 0}
    return figures


def mark(comparison: dict, split: str = "pooled", significant: str = "significant") -> str:
    """+ first significantly better, - significantly worse, = neither; `significant` is the
    raw ("significant") or the Holm-corrected ("significant_holm") decision."""
    c = comparison[split]
    return "=" if not c[significant] else "+" if c["first_better"] else "-"


def marks(comparisons: list[dict], split: str = "pooled") -> str:
    """The raw marks of `comparisons`, then the Holm-corrected ones: "+=+ (Holm +==)"."""
    return ("".join(mark(c, split) for c in comparisons) + " (Holm "
            + "".join(mark(c, split, "significant_holm") for c in comparisons) + ")")


def kept_units(kept: dict) -> dict:
    """A run's kept units under one set of names: wav2vec2's record says heads, qk_dims,
    v_dims, ffn_units; Whisper's encoder_heads and encoder_ffn_units (its L0 gates no dims)."""
    renamed = {"encoder_heads": "heads", "encoder_ffn_units": "ffn_units"}
    return {renamed.get(key, key): value for key, value in kept.items()}


def load(out: Path, name: str):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(ms: tuple[float, float]) -> str:
    return "-" if math.isnan(ms[0]) else f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


# --- the parts ---------------------------------------------------------------------------------

def l0_part(out: Path, seeds, settings, dense_decoding: dict) -> dict:
    rows, comparisons = [], []
    for setting in settings:
        for seed in seeds:
            for arm in (setting, f"structured-{setting}"):
                run = load(out, f"{arm}-s{seed}")
                if run is None:
                    continue
                compression = run.get("compression", {})
                rows.append({"arm": arm, "setting": setting, "seed": seed, **wers(run["decoding"]),
                             "params_total": run["params_total"], "prunable_params_kept": run["prunable_params_kept"],
                             "sparsity": run["sparsity"], "kept": kept_units(run["kept"]),
                             "sparsity_before_calibration": run.get("sparsity_before_calibration"),
                             "calibration_shift": compression.get("calibration_shift"),
                             "forward_time_ratio": run["forward_time_ratio"], "loop_seconds": run["loop_seconds"],
                             "vs_dense": compare(run["decoding"], dense_decoding), "history": run.get("history")})
            l0_run, structured_run = load(out, f"{setting}-s{seed}"), load(out, f"structured-{setting}-s{seed}")
            if l0_run and structured_run:
                comparisons.append({"first": setting, "second": f"structured-{setting}", "seed": seed,
                                    **compare(l0_run["decoding"], structured_run["decoding"])})
            default = load(out, f"{settings[0]}-s{seed}")
            if setting != settings[0] and l0_run and default:
                comparisons.append({"first": setting, "second": settings[0], "seed": seed,
                                    **compare(l0_run["decoding"], default["decoding"])})
    add_holm(comparisons)
    return {"runs": rows, "comparisons": comparisons}


def cluster_part(out: Path, names: list[tuple], dense_decoding: dict) -> dict:
    """names: (rule, mix, fold, sparsity, run name)."""
    rows = []
    for rule, mix, fold, sparsity, name in names:
        run = load(out, name)
        if run is None:
            continue
        clustered, magnitude = run["decoding"]["clustered"], run["decoding"]["magnitude"]
        rows.append({"rule": rule, "mix": mix, "fold": fold, "sparsity": sparsity, "kept": run["kept"],
                     "params_total": run["params_total"], "params_dense": run["params_dense"],
                     "clustered": wers(clustered), "magnitude": wers(magnitude),
                     "clustered_vs_magnitude": compare(clustered, magnitude),
                     "clustered_vs_dense": compare(clustered, dense_decoding),
                     "forward_time_ratio": run["forward_time_ratio"]})
        if fold and (unfolded := load(out, name.replace("-fold", ""))) is not None:     # the fold's own effect
            rows[-1]["fold_vs_no_fold"] = {
                "clustered": compare(clustered, unfolded["decoding"]["clustered"]),
                "magnitude": compare(magnitude, unfolded["decoding"]["magnitude"])}
    add_holm([row["clustered_vs_magnitude"] for row in rows])
    return {"runs": rows}


def recovery_part(out: Path, seeds, sparsities, rules) -> dict:
    rows, comparisons = [], []
    for sparsity in sparsities:
        for seed in seeds:
            baseline = load(out, f"recovery-structured-{sparsity:g}-s{seed}")
            if baseline:
                rows.append({"arm": "structured", "sparsity": sparsity, "seed": seed, **wers(baseline["decoding"]),
                             "steps": baseline["steps"], "params_total": baseline["params_total"],
                             "history": baseline.get("history")})
            for rule in rules:
                run = load(out, f"recovery-{rule}-{sparsity:g}-s{seed}")
                if run is None:
                    continue
                tuned = run["decoding"]["fine-tuned"]
                rows.append({"arm": rule, "sparsity": sparsity, "seed": seed, **wers(tuned), "steps": run["steps"],
                             "params_total": run["params_total"], "data_free": wers(run["decoding"]["clustered"]),
                             "history": run.get("history")})
                if baseline:
                    comparisons.append({"first": rule, "second": "structured", "sparsity": sparsity, "seed": seed,
                                        **compare(tuned, baseline["decoding"])})
    add_holm(comparisons)
    return {"runs": rows, "comparisons": comparisons}


# --- printing ---------------------------------------------------------------------------------

def summarise(rows: list[dict], key) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def print_l0(part: dict, settings, unstructured: dict, sparsity: float, steps: int) -> list[dict]:
    summary = []
    print(f"\n=== L0 at {100 * sparsity:.0f} %, {steps} steps, against structured magnitude pruning to each run's "
          f"own sizes ===")
    print(f"{'arm':<26}{'n':>2}{'dev+test':>16}{'test-unseen':>16}{'params':>9}{'heads/block':>13}{'v dims':>8}"
          f"{'FFN':>7}{'before cal.':>12}{'shift':>8}{'fwd':>6}")
    for (arm,), rows in summarise(part["runs"], lambda r: (r["arm"],)).items():
        heads = mean_sd([statistics.mean(r["kept"]["heads"]) for r in rows])
        v_dims = mean_sd([statistics.mean(r["kept"].get("v_dims", [0])) for r in rows])
        ffn = mean_sd([statistics.mean(r["kept"]["ffn_units"]) for r in rows])
        entry = {"arm": arm, "n": len(rows), "wer_pooled": mean_sd([r["pooled"] for r in rows]),
                 "wer_unseen": mean_sd([r["test-unseen"] for r in rows]),
                 "params_total": mean_sd([r["params_total"] for r in rows]), "heads_per_block": heads,
                 "v_dims_per_block": v_dims, "ffn_units_per_block": ffn,
                 "sparsity_before_calibration": mean_sd([r["sparsity_before_calibration"] for r in rows]),
                 "calibration_shift": mean_sd([r["calibration_shift"] for r in rows]),
                 "forward_time_ratio": mean_sd([r["forward_time_ratio"] for r in rows])}
        summary.append(entry)
        before = entry["sparsity_before_calibration"]
        shift = entry["calibration_shift"]
        print(f"{arm:<26}{len(rows):>2}{pct(entry['wer_pooled']):>16}{pct(entry['wer_unseen']):>16}"
              f"{entry['params_total'][0] / 1e6:8.2f}M{heads[0]:13.2f}{v_dims[0]:8.0f}{ffn[0]:7.0f}"
              f"{'-' if math.isnan(before[0]) else f'{100 * before[0]:.2f}%':>12}"
              f"{'-' if math.isnan(shift[0]) else f'{shift[0]:+.2f}':>8}{entry['forward_time_ratio'][0]:6.2f}")
    for arm, figures in unstructured.items():
        print(f"{arm + ' (SPG experiment)':<26}{figures['n']:>2}{pct(figures['wer_pooled']):>16}"
              f"{pct(figures['wer_unseen']):>16}  (unstructured, zeros in dense shapes, same {steps} steps and seeds)")
    print("MAPSSWE per seed, raw p < 0.05 and Holm over the table's tests (pooled dev+test; test-unseen after |):")
    for (first, second), comps in summarise(part["comparisons"], lambda c: (c["first"], c["second"])).items():
        print(f"  {first} vs {second}: {marks(comps)} | {marks(comps, 'test-unseen')}")
    return summary


def print_cluster(part: dict) -> None:
    print("\n=== data-free clustering (k-means seed 0) against structured magnitude pruning at the same sizes ===")
    print(f"{'sparsity':<9}{'K':<10}{'fold':<6}" + "".join(f"{r:>16}" for r in ("mean", "sum_out", "representative"))
          + f"{'magnitude':>11}{'params':>9}{'fwd':>6}")
    for (sparsity, mix, fold), rows in summarise(part["runs"], lambda r: (r["sparsity"], r["mix"], r["fold"])).items():
        by_rule = {r["rule"]: r for r in rows}
        cells = ""
        for rule in ("mean", "sum_out", "representative"):
            row = by_rule.get(rule)
            cells += f"{'-':>16}" if row is None else \
                f"{100 * row['clustered']['pooled']:>12.2f} {mark(row['clustered_vs_magnitude'])}" \
                f"{mark(row['clustered_vs_magnitude'], 'pooled', 'significant_holm')} "
        first = rows[0]
        print(f"{100 * sparsity:<8.0f}%{mix:<10}{'yes' if fold else 'no':<6}{cells}"
              f"{100 * first['magnitude']['pooled']:>10.2f}%{first['params_total'] / 1e6:8.2f}M"
              f"{first['forward_time_ratio']:6.2f}")
    print("(+/-/=: MAPSSWE of the rule against magnitude, pooled dev+test: raw p < 0.05, then Holm over the table)")
    folds = [r for r in part["runs"] if "fold_vs_no_fold" in r]
    if folds:
        print("the bias fold against the same run without it (MAPSSWE, pooled; + the fold better): " + "; ".join(
            f"{100 * r['sparsity']:.0f}% {r['mix']} {r['rule']} {mark(r['fold_vs_no_fold']['clustered'])}"
            for r in folds) + "; magnitude " + ", ".join(
            f"{100 * r['sparsity']:.0f}% {r['mix']} {mark(r['fold_vs_no_fold']['magnitude'])}"
            for r in folds if r["rule"] == "mean"))


def print_recovery(part: dict) -> list[dict]:
    summary = []
    print("\n=== --epochs 1 recovery (375 steps), uniform K, against structured magnitude with the same steps ===")
    for (sparsity, arm), rows in summarise(part["runs"], lambda r: (r["sparsity"], r["arm"])).items():
        entry = {"sparsity": sparsity, "arm": arm, "n": len(rows), "wer_pooled": mean_sd([r["pooled"] for r in rows]),
                 "wer_unseen": mean_sd([r["test-unseen"] for r in rows]),
                 "data_free": mean_sd([r["data_free"]["pooled"] for r in rows if "data_free" in r])}
        summary.append(entry)
        print(f"{100 * sparsity:3.0f}% {arm:<16}{len(rows):>2}{pct(entry['wer_pooled']):>16}{pct(entry['wer_unseen']):>16}"
              + (f"   (data-free {pct(entry['data_free'])})" if not math.isnan(entry["data_free"][0]) else ""))
    for (sparsity, first), comps in summarise(part["comparisons"], lambda c: (c["sparsity"], c["first"])).items():
        print(f"  {100 * sparsity:.0f}% {first} vs structured: {marks(comps)} | {marks(comps, 'test-unseen')}")
    return summary


def unstructured_rows(path: Path, sparsity: float) -> dict:
    if not path.exists():
        return {}
    experiment = json.loads(path.read_text())
    return {row["arm"]: {"n": row["n"], "wer_pooled": tuple(row["wer_pooled"]), "wer_unseen": tuple(row["wer_unseen"])}
            for row in experiment["summary"] if row["sparsity"] == sparsity and row["arm"] in ("spg", "ump")}


def report(args, out: Path) -> dict:
    import structured_experiment as experiment
    dense = json.loads((out / "dense-decoding.json").read_text())["results"]
    dense_decoding = {split: {"references": dense[split]["references"], "hypotheses": dense[split]["hypotheses"]}
                      for split in (*POOLED, "test-unseen")}
    chosen = getattr(args, "l0_settings", experiment.L0_SETTINGS)
    l0_sparsity = getattr(args, "l0_sparsity", experiment.L0_SPARSITY)
    settings = [setting for setting in experiment.L0_SETTINGS if setting in chosen]
    sparsities = getattr(args, "sparsities", experiment.CLUSTER_SPARSITIES)
    cluster_names = [(rule, mix, fold, s, experiment.cluster_name(rule, mix, fold, s))
                     for s in sparsities for mix in experiment.MIXES for fold in (False, True)
                     for rule in experiment.RULES]
    results = {"model": getattr(args, "model", None) or "the shipped model", "dense": wers(dense_decoding),
               "seeds": args.seeds, "l0_sparsity": l0_sparsity,
               "l0_steps": experiment.L0_STEPS, "recovery_steps": experiment.RECOVERY_STEPS,
               "l0_settings": experiment.L0_SETTINGS,
               "l0": l0_part(out, args.seeds, settings, dense_decoding),
               "cluster": cluster_part(out, cluster_names, dense_decoding),
               "recovery": recovery_part(out, args.seeds, sparsities, experiment.RECOVERY_RULES)}
    if getattr(args, "train_options", None):    # train.py options beyond the experiment's own
        results["train_options"] = args.train_options
    print(f"dense: dev+test {100 * results['dense']['pooled']:.2f}%, test-unseen {100 * results['dense']['test-unseen']:.2f}%")
    results["unstructured"] = unstructured_rows(Path(args.spg_results), l0_sparsity)
    results["l0_summary"] = print_l0(results["l0"], settings, results["unstructured"], l0_sparsity,
                                     experiment.L0_STEPS)
    print_cluster(results["cluster"])
    results["recovery_summary"] = print_recovery(results["recovery"])
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(results), separators=(",", ":")) + "\n")
    print(f"results written to {path}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from figures import write_structured_figures
    figures = write_structured_figures(results, path)
    if figures:
        print("figures written to " + ", ".join(str(f) for f in figures))
    return results
