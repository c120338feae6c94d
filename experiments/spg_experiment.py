#!/usr/bin/env python
"""SPG against its baselines with seeds: the experiment that can rank them (issue 15).

    python experiments/spg_experiment.py                 # 5 arms x {60,70,80}% x 3 seeds, 300 steps
    python experiments/spg_experiment.py --report        # only the table, from the runs so far

Arms, every one with the same steps, batch, learning-rate schedule, seeds and corpus:
    spg       SPG as train.py runs it by default (the authors' balance: CTC summed over the batch,
              raw eta by target, two-sided band controller, weight decay 0, no clipping)
    spg-mean  SPG with the settings it had before (mean-reduced CTC, normalised eta', on/off
              controller with optimiser resets, the weights' lr for the thresholds, weight
              decay 0.01, clipping at 5): the ablation
    ump       uniform magnitude pruning, then fixed-mask fine-tuning
    gmp       one-shot global magnitude pruning, then fixed-mask fine-tuning
    mixed     SPG's per-matrix sparsities (the spg run of the same seed), magnitude masks
The baselines use train.py's defaults, i.e. the same summed CTC and optimiser settings as spg.

Each run is one `train.py` process (one OpenMP thread each, --workers at a time: on 2 cores two
single-thread runs give about twice the throughput of one two-thread run), writes
<out>/<arm>-<sparsity>-s<seed>.{pt,json,log} and saves a resume state every 100 steps; an
interrupted experiment continues where it stopped when started again (finished runs are
skipped, unfinished ones resume). The report pools dev and test (the built-in corpus's seen
speakers) and shows test-unseen separately: WER mean and s.d. over seeds, MAPSSWE of SPG
against each baseline per seed (pooled split), the highest lossless sparsity per method
and seed (no significant increase over dense on the pooled split at that sparsity and every
lower one), SPG's first step at the target, its allocation's correlation with global
magnitude pruning, and the training-loop time of each arm (SPG/UMP last).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import POOLED, add_holm, mean_sd, pooled_decoding, require_finished_runs, rounded  # noqa: E402
from runner import Job, run_jobs  # noqa: E402

from spg.compress import self_pinching  # noqa: E402
from spg.wer import error_counts, holm, mapsswe  # noqa: E402

ARMS = ("spg", "spg-mean", "ump", "gmp", "mixed")
# One ingredient of the default changed at a time, at --ablation-sparsity only (--ablations)
ABLATIONS = ("spg-slow", "spg-mean-fast", "spg-on-off")
BASELINES = ("spg-mean", "ump", "gmp", "mixed") + ABLATIONS


def arm_options(arm: str, sparsity: float, lr: float) -> list[str]:
    """train.py options of one arm (beyond the common ones)."""
    if arm == "spg":
        return ["--method", "spg"]
    if arm == "spg-mean":          # the settings of SPG before issue 15, spelled out
        return ["--method", "spg", "--ctc-reduction", "mean", "--eta", f"{self_pinching.default_eta(sparsity):g}",
                "--controller", "on-off", "--reset", "--threshold-lr", f"{lr:g}", "--weight-decay", "0.01",
                "--grad-clip", "5"]
    if arm == "spg-slow":          # the thresholds at the weights' lr (the paper's), all else the default
        return ["--method", "spg", "--threshold-lr", f"{lr:g}"]
    if arm == "spg-mean-fast":     # the earlier balance, with the default's threshold learning rate
        return arm_options("spg-mean", sparsity, lr)[:-6] + ["--weight-decay", "0.01", "--grad-clip", "5"]
    if arm == "spg-on-off":        # the paper's on/off controller (with our resets) instead of the band
        return ["--method", "spg", "--controller", "on-off"]
    return ["--method", arm]


def stem(out: Path, arm: str, sparsity: float, seed: int, suffix: str = "") -> Path:
    """<out>/<arm>-<sparsity>-s<seed><suffix> (not Path.with_suffix: "0.7" has a dot)."""
    return out / f"{arm}-{sparsity:g}-s{seed}{suffix}"


def run_all(args, out: Path, passthrough: list[str]) -> None:
    """Run every (sparsity, seed, arm) not finished yet, `args.workers` at a time; `mixed`
    waits for the spg run of its sparsity and seed."""
    runs = [(arm, sparsity, seed) for sparsity in args.sparsities for seed in args.seeds for arm in args.arms]
    if args.ablations:
        runs += [(arm, args.ablation_sparsity, seed) for seed in args.seeds for arm in ABLATIONS]
    jobs = []
    for arm, sparsity, seed in runs:
        options = ["--sparsity", str(sparsity), "--seed", str(seed), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size),
                   "--dense-eval", str(out / "dense-decoding.json"), "--save-every", "100",
                   *arm_options(arm, sparsity, args.lr), "--lr", f"{args.lr:g}", *passthrough]
        job = Job(stem(out, arm, sparsity, seed), options)
        if arm == "mixed":
            source = stem(out, "spg", sparsity, seed)
            job.options += ["--mixed-from", f"{source}.pt"]
            job.waits_for, job.after = Path(f"{source}.json"), source
        jobs.append(job)
    run_jobs(REPO, jobs, args.workers)


def report(args, out: Path, passthrough: list[str]) -> dict:
    runs = {}
    for sparsity in args.sparsities:
        for seed in args.seeds:
            for arm in ARMS + ABLATIONS:
                path = stem(out, arm, sparsity, seed, ".json")
                if path.exists():
                    runs[arm, sparsity, seed] = json.loads(path.read_text())
    first = next(iter(runs.values()))
    dense_cache = json.loads((out / "dense-decoding.json").read_text())
    dense_hyp = {split: dense_cache["results"][split]["hypotheses"] for split in (*POOLED, "test-unseen")}

    rows, comparisons = [], []
    for (arm, sparsity, seed), run in runs.items():
        references, hypotheses = pooled_decoding(run["decoding"])
        counts = error_counts(references, hypotheses)
        pooled = counts.rate
        unseen = run["compressed_wer"]["test-unseen"]
        allocation = run.get("allocation", {})
        rows.append({"arm": arm, "sparsity": sparsity, "seed": seed, "wer_pooled": pooled, "wer_unseen": unseen,
                     "wer": run["compressed_wer"], "sparsity_reached": run["sparsity"],
                     "params_nonzero": run["params_nonzero"], "params_total": run["params_total"],
                     "sparsity_before_calibration": run["sparsity_before_calibration"],
                     "first_reached_step": allocation.get("first_reached_step"),
                     "correlation_with_global_magnitude": allocation.get("correlation_with_global_magnitude"),
                     "threshold_relative_sd": allocation.get("threshold_relative_sd"),
                     "loop_seconds": run["loop_seconds"], "train_seconds": run["train_seconds"],
                     "mapsswe_vs_dense": run["mapsswe"], "pooled_vs_dense": pooled_against_dense(run, dense_hyp),
                     "per_matrix_sparsity": run["per_matrix_sparsity"],
                     "history": run.get("history"), "spg_history": run.get("spg_history")})
    by_key = {(r["arm"], r["sparsity"], r["seed"]): r for r in rows}
    for sparsity in args.sparsities:
        for seed in args.seeds:
            if ("spg", sparsity, seed) not in runs:
                continue
            spg_refs, spg_hyp = pooled_decoding(runs["spg", sparsity, seed]["decoding"])
            for baseline in BASELINES:
                if (baseline, sparsity, seed) not in runs:
                    continue
                _, base_hyp = pooled_decoding(runs[baseline, sparsity, seed]["decoding"])
                test = mapsswe(spg_refs, spg_hyp, base_hyp, alpha=0.05)
                unseen = runs["spg", sparsity, seed]["decoding"]["test-unseen"]
                test_unseen = mapsswe(unseen["references"], unseen["hypotheses"],
                                      runs[baseline, sparsity, seed]["decoding"]["test-unseen"]["hypotheses"],
                                      alpha=0.05)
                comparisons.append({"sparsity": sparsity, "seed": seed, "baseline": baseline,
                                    "pooled": {"p": test.p_value, "z": test.z, "significant": test.significant,
                                               "spg_better": test.mean_difference < 0},
                                    "test-unseen": {"p": test_unseen.p_value, "z": test_unseen.z,
                                                    "significant": test_unseen.significant,
                                                    "spg_better": test_unseen.mean_difference < 0}})

    # Holm over each table's tests: SPG against the baselines (one family per split), every run
    # against dense (the lossless table)
    add_holm(comparisons)
    adjusted, rejected = holm([r["pooled_vs_dense"]["p"] for r in rows], alpha=0.05)
    for r, p_holm, significant in zip(rows, adjusted, rejected):
        r["pooled_vs_dense"].update(p_holm=p_holm, worse_holm=significant and r["pooled_vs_dense"]["z"] > 0)

    # dense WER on the pooled split, from one run's dense decoding figures
    words = {split: sum(len(r.split()) for r in first["decoding"][split]["references"]) for split in POOLED}
    dense_pooled = sum(first["dense_wer"][s] * words[s] for s in POOLED) / sum(words.values())
    lossless = highest_lossless(args, runs, by_key, "worse")
    lossless_holm = highest_lossless(args, runs, by_key, "worse_holm")

    print(f"\n=== {args.steps} steps, batch {args.batch_size}, seeds {args.seeds}; WER in %, mean ± s.d. over seeds "
          f"(n = runs finished); dense: dev+test {100 * dense_pooled:.2f}, test-unseen "
          f"{100 * first['dense_wer']['test-unseen']:.2f}")
    print(f"{'arm':<10}{'sparsity':>9}{'n':>3}{'dev+test':>16}{'test-unseen':>16}{'reached at':>12}{'corr GMP':>10}"
          f"{'loop s':>8}")
    summary_rows = []
    for sparsity in args.sparsities:
        for arm in ARMS + ABLATIONS:
            chosen = [by_key[arm, sparsity, seed] for seed in args.seeds if (arm, sparsity, seed) in by_key]
            if not chosen:
                continue
            pooled, unseen = mean_sd([r["wer_pooled"] for r in chosen]), mean_sd([r["wer_unseen"] for r in chosen])
            reached = mean_sd([r["first_reached_step"] for r in chosen])
            corr = mean_sd([r["correlation_with_global_magnitude"] for r in chosen])
            loop = mean_sd([r["loop_seconds"] for r in chosen])
            summary_rows.append({"arm": arm, "sparsity": sparsity, "n": len(chosen), "wer_pooled": pooled,
                                 "wer_unseen": unseen, "first_reached_step": reached,
                                 "correlation_with_global_magnitude": corr, "loop_seconds": loop})
            cell = lambda ms: "-" if math.isnan(ms[0]) else f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"  # noqa: E731
            print(f"{arm:<10}{100 * sparsity:8.0f}%{len(chosen):>3}{cell(pooled):>16}{cell(unseen):>16}"
                  f"{'-' if math.isnan(reached[0]) else f'{reached[0]:.0f}':>12}"
                  f"{'-' if math.isnan(corr[0]) else f'{corr[0]:.2f}':>10}{loop[0]:8.0f}")
    print("\nMAPSSWE of spg against each baseline, per seed (pooled dev+test; + spg significantly better, "
          f"- significantly worse, = no significant difference; raw p < 0.05, then Holm over the table's "
          f"{len(comparisons)} tests):")
    for sparsity in args.sparsities:
        cells = []
        for baseline in BASELINES:
            chosen = [c for c in comparisons if c["sparsity"] == sparsity and c["baseline"] == baseline]
            if not chosen:
                continue
            raw = "".join(comparison_mark(c["pooled"], "significant") for c in chosen)
            corrected = "".join(comparison_mark(c["pooled"], "significant_holm") for c in chosen)
            cells.append(f"vs {baseline} {raw} (Holm {corrected})")
        print(f"  {100 * sparsity:.0f}%: " + ", ".join(cells))
    lowest = f"<{100 * min(args.sparsities):.0f}%"        # 0 in the JSON: not lossless at any measured sparsity
    print("highest lossless sparsity per seed (pooled dev+test, MAPSSWE against dense): "
          + "; ".join(f"{arm} " + ", ".join(f"{100 * s:.0f}%" if s else lowest for s in values)
                      for arm, values in lossless.items()))
    print("  with Holm over the table's " + f"{len(rows)} tests against dense: "
          + "; ".join(f"{arm} " + ", ".join(f"{100 * s:.0f}%" if s else lowest for s in values)
                      for arm, values in lossless_holm.items()))
    loop = {arm: statistics.median(r["loop_seconds"] for r in rows if r["arm"] == arm) for arm in ARMS + ABLATIONS
            if any(r["arm"] == arm for r in rows)}
    results = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
               "sparsities": args.sparsities, "arms": {arm: arm_options(arm, 0.7, args.lr) for arm in ARMS + ABLATIONS},
               "model": passthrough[passthrough.index("--model") + 1] if "--model" in passthrough
               else "the shipped model",
               "workers": args.workers, "dense_wer": first["dense_wer"], "dense_wer_pooled": dense_pooled,
               "summary": summary_rows, "comparisons": comparisons, "max_lossless": lossless,
               "max_lossless_holm": lossless_holm, "multiple_comparisons": "Holm (1979) over each table: the "
               "SPG-baseline tests of one split, and every run's test against dense",
               "max_lossless_note": "per seed; 0 = significantly worse than dense at every measured sparsity",
               "loop_seconds_median": loop, "runs": rows}
    if args.timing_steps:
        ratio, plain, gated = step_time_ratio(steps=args.timing_steps, rounds=args.timing_rounds, passthrough=passthrough)
        results.update(step_seconds={"plain": plain, "spg": gated}, step_time_ratio=ratio)
        print(f"seconds per step, alone on the machine: plain {statistics.median(plain):.3f}, SPG "
              f"{statistics.median(gated):.3f} (batch 8, {args.timing_steps} steps x {args.timing_rounds} rounds, "
              "interleaved)")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(rounded(results), separators=(",", ":")) + "\n")   # compact: ~1 MB
    print(f"results written to {results_path}")
    from figures import write_spg_figures
    figures = write_spg_figures(results, results_path)
    print("figures written to " + ", ".join(str(f) for f in figures))
    if "spg" in loop and "ump" in loop:
        print(f"SPG/UMP training-loop time per run (median, {args.workers} runs at a time): "
              f"{loop['spg'] / loop['ump']:.2f}")
    if args.timing_steps:
        print(f"SPG/plain training-step time: {results['step_time_ratio']:.2f}")
    return results


def step_time_ratio(*, steps: int, rounds: int, passthrough: list[str]) -> tuple[float, list[float], list[float]]:
    """Seconds per optimiser step of SPG over plain CTC fine-tuning (both with the default
    settings), on the same batches, alternating, in this process."""
    import spg
    import train
    from spg.compress.interface import Method
    from spg.compress.self_pinching import SPG
    from spg.corpus import build_corpus
    from spg.ctc_training import CTCObjective
    from spg.data import read_corpus
    from spg.training import TrainConfig
    from spg.training import train as train_loop
    data_root = Path(passthrough[passthrough.index("--data") + 1]) if "--data" in passthrough else build_corpus()
    cache = passthrough[passthrough.index("--feature-cache") + 1] if "--feature-cache" in passthrough \
        else str(REPO / "runs" / "feature-cache")
    plain_times, spg_times = [], []
    for _ in range(rounds):
        for label, make_method in (("plain", Method), ("spg", lambda: SPG(0.6, eta=1e-4, normalised_eta=False,
                                                                          band=0.002, reset_on_switch=False,
                                                                          threshold_lr=5e-3))):
            model = spg.load(train.DEFAULT_MODEL)
            utterances = read_corpus(data_root, "train", model.vocab)
            config = TrainConfig(steps=steps, batch_size=8, lr=2e-4, save_every=0, feature_cache_dir=cache,
                                 loss_reduction="sum", weight_decay=0.0, grad_clip=0.0)
            result = train_loop(model, utterances, config, objective=CTCObjective(),
                                method=make_method(), progress=False)
            (plain_times if label == "plain" else spg_times).append(result.loop_seconds / steps)
    return statistics.median(spg_times) / statistics.median(plain_times), plain_times, spg_times


def comparison_mark(test: dict, significant: str) -> str:
    """+ spg significantly better, - significantly worse, = neither (by the `significant` key)."""
    return "=" if not test[significant] else "+" if test["spg_better"] else "-"


def highest_lossless(args, runs: dict, by_key: dict, worse: str) -> dict:
    """{arm: [per seed, the highest sparsity at which the run and every lower-sparsity run of
    the seed are not significantly worse than dense (by the `worse` key); 0 if none]}."""
    lossless = {}
    for arm in ARMS:
        for seed in args.seeds:
            if not any((arm, sparsity, seed) in runs for sparsity in args.sparsities):
                continue                         # this arm has no run with this seed
            best = 0.0
            for sparsity in sorted(args.sparsities):
                row = by_key.get((arm, sparsity, seed))
                if row is None or row["pooled_vs_dense"][worse]:
                    break
                best = sparsity
            lossless.setdefault(arm, []).append(best)
    return lossless


def pooled_against_dense(run: dict, dense_hyp: dict) -> dict:
    """MAPSSWE (alpha 0.05) of the run against dense on dev+test pooled."""
    references, hypotheses = pooled_decoding(run["decoding"])
    test = mapsswe(references, hypotheses, dense_hyp["dev"] + dense_hyp["test"], alpha=0.05)
    return {"p": test.p_value, "z": test.z, "significant": test.significant,
            "worse": test.significant and test.mean_difference > 0}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.6, 0.8],
                        help="in the order they run (default: 70 %% first)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "spg-experiment"))
    parser.add_argument("--results", default=str(REPO / "results" / "spg_experiment.json"))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="the arms to run (default all; e.g. extra seeds for two of them)")
    parser.add_argument("--ablations", action="store_true",
                        help=f"also run {', '.join(ABLATIONS)} at --ablation-sparsity (one ingredient changed each)")
    parser.add_argument("--ablation-sparsity", type=float, default=0.7)
    parser.add_argument("--report", action="store_true", help="only the report, from the runs finished so far")
    parser.add_argument("--timing-steps", type=int, default=40,
                        help="steps per round of the SPG/plain step-time measurement at the end (0: skip)")
    parser.add_argument("--timing-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        run_all(args, out, passthrough)
    args.sparsities = sorted(args.sparsities)
    require_finished_runs(out, [stem(out, arm, sparsity, seed) for sparsity in args.sparsities
                                for seed in args.seeds for arm in ARMS + ABLATIONS])
    report(args, out, passthrough)
    return 0


if __name__ == "__main__":
    sys.exit(main())
