#!/usr/bin/env python
"""SPG against its baselines over a range of sparsities (the SPG paper's Table 1 / Fig. 2 shape).

    python tests/bench/spg_sweep.py                        # 0.5 ... 0.9 on the built-in setup
    python tests/bench/spg_sweep.py --sparsities 0.6 0.8 --steps 300 -- --data /data/LibriSpeech

For every sparsity it runs `train.py` with --method spg, then mixed (reading that SPG run's
per-matrix sparsities), then ump, all with the same steps and seed, writes each run's JSON
under --out, and prints one table: test WER per method and the MAPSSWE verdict against the
dense model. "Max lossless sparsity" is the highest sparsity whose test WER is not
significantly worse than dense (alpha = 0.05), the paper's criterion. It then prints the
compression time of each method and, last, the time of an SPG training step against a plain
fine-tuning step on the same batches (measured in this process, interleaved).

The figures go to --results (default results/spg_sweep.json, read by notebooks/6). Arguments
after `--` go to every train.py call unchanged. Each default run takes ~5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from spg.compress.interface import Method  # noqa: E402
from spg.compress.self_pinching import SPG  # noqa: E402
from spg.data import read_corpus  # noqa: E402
from spg.training import TrainConfig  # noqa: E402
from spg.training import train as train_loop  # noqa: E402

METHODS = ("spg", "mixed", "ump")


def step_time_ratio(model_path: Path, data_root: Path, *, steps: int, rounds: int, batch_size: int,
                    feature_cache: str) -> tuple[float, list[float], list[float]]:
    """Seconds per optimiser step of SPG over plain CTC fine-tuning, same batches, alternating."""
    import spg
    plain_times, spg_times = [], []
    for _ in range(rounds):
        for label, make_method in (("plain", Method), ("spg", lambda: SPG(0.6))):
            model = spg.load(model_path)
            utterances = read_corpus(data_root, "train", model.vocab)
            config = TrainConfig(steps=steps, batch_size=batch_size, lr=2e-4, save_every=0,
                                 feature_cache_dir=feature_cache)
            result = train_loop(model, utterances, config, method=make_method(), progress=False)
            (plain_times if label == "plain" else spg_times).append(result.loop_seconds / steps)
    return statistics.median(spg_times) / statistics.median(plain_times), plain_times, spg_times


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--steps", type=int, default=train.DEFAULT_STEPS)
    parser.add_argument("--split", default="test", help="split whose WER the table shows")
    parser.add_argument("--out", default=str(REPO / "runs" / "sweep"))
    parser.add_argument("--results", default=str(REPO / "results" / "spg_sweep.json"))
    parser.add_argument("--timing-steps", type=int, default=40, help="steps per timing round (0: skip timing)")
    parser.add_argument("--timing-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense_eval = out / "dense-decoding.json"

    results: dict[tuple[str, float], dict] = {}
    for sparsity in args.sparsities:
        for method in METHODS:
            stem = out / f"{method}-{sparsity:g}"
            call = ["--method", method, "--sparsity", str(sparsity), "--steps", str(args.steps),
                    "--out", f"{stem}.pt", "--json", f"{stem}.json", "--dense-eval", str(dense_eval)] + passthrough
            if method == "mixed":
                call += ["--mixed-from", str(out / f"spg-{sparsity:g}.pt")]
            if Path(f"{stem}.json").exists():
                print(f"\n##### reusing {stem}.json (delete it to run again)", flush=True)
            else:
                print(f"\n##### train.py {' '.join(call)}", flush=True)
                train.main(call)
            results[method, sparsity] = json.loads(Path(f"{stem}.json").read_text())

    first = next(iter(results.values()))
    dense = first["dense_wer"][args.split]
    lossless = {m: 0.0 for m in METHODS}
    runs = []
    for (method, sparsity), run in results.items():
        worse = {split: bool(test["significant"] and run["compressed_wer"][split] > run["dense_wer"][split])
                 for split, test in run["mapsswe"].items()}
        runs.append({"method": method, "sparsity": sparsity, "achieved_sparsity": run["sparsity"],
                     "wer": run["compressed_wer"],
                     "mapsswe": {split: {"p": test["p_value"], "significant": test["significant"],
                                         "worse": worse[split]} for split, test in run["mapsswe"].items()},
                     "params_total": run["params_total"], "params_nonzero": run["params_nonzero"],
                     "seconds": run["seconds"], "train_seconds": run["train_seconds"],
                     "per_matrix_sparsity": run["per_matrix_sparsity"]})
    by_point = {(r["method"], r["sparsity"]): r for r in runs}
    for method in METHODS:      # lossless: every sparsity up to this one is not significantly worse
        for sparsity in sorted(args.sparsities):
            if by_point[method, sparsity]["mapsswe"][args.split]["worse"]:
                break
            lossless[method] = sparsity

    print(f"\n=== {args.split} WER (dense {100 * dense:.2f}%); * = significantly worse than dense "
          f"(MAPSSWE, alpha 0.05); {args.steps} steps per run")
    print(f"{'sparsity':>9}" + "".join(f"{m:>12}" for m in METHODS))
    for sparsity in args.sparsities:
        cells = []
        for method in METHODS:
            run = by_point[method, sparsity]
            cells.append(f"{100 * run['wer'][args.split]:.2f}%{'*' if run['mapsswe'][args.split]['worse'] else ' '}")
        print(f"{100 * sparsity:8.0f}%" + "".join(f"{c:>12}" for c in cells))
    print("max lossless sparsity (no significant increase up to it): "
          + ", ".join(f"{m} {100 * s:.0f}%" for m, s in lossless.items()))
    compression_seconds = {m: statistics.mean(r["train_seconds"] for r in runs if r["method"] == m) for m in METHODS}
    print("mean compression (training) time per run: "
          + ", ".join(f"{m} {s:.0f} s" for m, s in compression_seconds.items()))

    summary = {"split": args.split, "steps": args.steps, "dense_wer": first["dense_wer"], "runs": runs,
               "max_lossless": lossless, "compression_seconds": compression_seconds}
    if args.timing_steps:
        data_root = Path(passthrough[passthrough.index("--data") + 1]) if "--data" in passthrough else None
        if data_root is None:
            from spg.corpus import build_corpus
            data_root = build_corpus()
        model_path = Path(passthrough[passthrough.index("--model") + 1]) if "--model" in passthrough \
            else train.DEFAULT_MODEL
        ratio, plain, gated = step_time_ratio(model_path, data_root, steps=args.timing_steps,
                                              rounds=args.timing_rounds, batch_size=8,
                                              feature_cache=str(REPO / "runs" / "feature-cache"))
        summary["step_seconds"] = {"plain": plain, "spg": gated}
        summary["step_time_ratio"] = ratio
        print(f"seconds per step: plain {statistics.median(plain):.3f}, SPG {statistics.median(gated):.3f} "
              f"(batch 8, {args.timing_steps} steps x {args.timing_rounds} rounds, interleaved)")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results written to {results_path}")
    if args.timing_steps:
        print(f"SPG/plain training-step time: {summary['step_time_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
