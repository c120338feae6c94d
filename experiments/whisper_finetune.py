#!/usr/bin/env python
"""SPG and UMP on a real Whisper (tiny.en) with a short fine-tuning on the built-in corpus.

    OMP_WAIT_POLICY=PASSIVE python experiments/whisper_finetune.py    # results/ as committed
    python experiments/whisper_finetune.py --print-only               # the table of the JSON

Runs `train.py --model whisper-tiny.en` (teacher-forced decoder cross-entropy,
spg/whisper/training.py) for every row below, each with the same steps, batch, learning rate
and seed, skipping a run whose JSON already exists under --out:

    spg   at 30 % and 50 %   (thresholds learn at --threshold-lr; the weights at --lr)
    ump   at 30 % and 50 %   (magnitude masks fixed, then the same fine-tuning)
    ump   at 30 % and 50 % with 0 steps (magnitude pruning alone: what fine-tuning recovers)
    dense fine-tuning        (no pruning: what fine-tuning on synthetic speech alone does)

Then it decodes the uncompressed model and every result on the same sets, with the same
code: the real recordings in recordings/ (librivox: 5 LibriVox sentences, cards: 5 card
names, beckett: one quotation; "real" pools the 11) and the first --utterances of the
built-in test split. WER after spg.text.normalize_english; MAPSSWE (alpha 0.05) against
the uncompressed model on "real" and on the built-in test. Prunable matrices: every
attention projection and FFN matrix of the encoder and the decoder (16.5 M weights).

Writes results/whisper_finetune.json:
    {"model": ..., "settings": {...train.py arguments...}, "datasets": {name: utterances},
     "rows": [{"name", "method", "sparsity", "steps", "wer": {set: float}, "cer": {set: float},
               "mapsswe": {set: {"p_value", "significant", "worse"}}, "train_seconds"}],
     "seconds": wall time of the decoding}
Every input is padded to Whisper's 30 s window: a training step of 4 utterances takes about
6-10 s on 2 CPU cores, so the whole table takes about 90 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import spg  # noqa: E402
from spg.files import atomic_write  # noqa: E402
from spg.data import read_corpus  # noqa: E402
from spg.wer import error_counts, mapsswe  # noqa: E402
from spg.whisper.evaluation import evaluate_whisper, read_transcription_folder  # noqa: E402

MODEL = "whisper-tiny.en"
REAL = ("librivox", "cards", "beckett")
# (name, train.py arguments beyond the common ones)
RUNS = [
    ("spg-0.3", ["--method", "spg", "--sparsity", "0.3"]),
    ("ump-0.3", ["--method", "ump", "--sparsity", "0.3"]),
    ("spg-0.5", ["--method", "spg", "--sparsity", "0.5"]),
    ("ump-0.5", ["--method", "ump", "--sparsity", "0.5"]),
    ("ump-0.3-noft", ["--method", "ump", "--sparsity", "0.3", "--steps", "0"]),
    ("ump-0.5-noft", ["--method", "ump", "--sparsity", "0.5", "--steps", "0"]),
    ("dense-ft", ["--method", "dense", "--sparsity", "0"]),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "whisper"), help="run checkpoints and JSONs")
    parser.add_argument("--results", default=str(REPO / "results" / "whisper_finetune.json"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--threshold-lr", type=float, default=5e-4)
    parser.add_argument("--utterances", type=int, default=20, help="built-in test utterances to score")
    parser.add_argument("--print-only", action="store_true")
    return parser.parse_args()


def train_runs(args) -> dict:
    """Run train.py for every row that has no JSON yet; return {name: its summary}."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model", MODEL, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--warmup", "0.1", "--eval-utterances", str(args.utterances), "--save-every", "40"]
    summaries = {}
    for name, extra in RUNS:
        summary_path = out / f"{name}.json"
        if not summary_path.exists():
            command = [sys.executable, str(REPO / "train.py"), *common, *extra, "--out", str(out / f"{name}.pt"),
                       "--json", str(summary_path)]
            if "spg" in extra:
                command += ["--threshold-lr", str(args.threshold_lr)]
            print(" ".join(command[1:]), flush=True)
            with open(out / f"{name}.log", "w") as log:
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        summaries[name] = json.loads(summary_path.read_text())
    return summaries


def evaluation_sets(count: int) -> dict:
    from spg.corpus import build_corpus
    sets = {name: read_transcription_folder(REPO / "recordings" / name) for name in REAL}
    sets["test"] = read_corpus(build_corpus(), "test")[:count]
    return sets


def score(model, sets: dict) -> dict:
    """WER/CER and hypotheses per set, plus "real": the real sets pooled."""
    results = {name: evaluate_whisper(model, data) for name, data in sets.items()}
    references = [r for name in REAL for r in results[name]["references"]]
    hypotheses = [h for name in REAL for h in results[name]["hypotheses"]]
    counts = error_counts(references, hypotheses)
    results["real"] = {"wer": counts.rate, "cer": None, "references": references, "hypotheses": hypotheses}
    return results


def measure(args, summaries: dict) -> dict:
    started = time.time()
    sets = evaluation_sets(args.utterances)
    dense = score(spg.load(MODEL), sets)
    rows = [{"name": "dense", "method": "none", "sparsity": 0.0, "steps": 0,
             "wer": {k: v["wer"] for k, v in dense.items()}, "cer": {k: v["cer"] for k, v in dense.items()},
             "mapsswe": {}, "train_seconds": 0.0}]
    for name, _ in RUNS:
        summary = summaries[name]
        print(f"decoding {name}", flush=True)
        results = score(spg.load(summary["out"]), sets)
        tests = {}
        for split in ("real", "test"):
            outcome = mapsswe(results[split]["references"], results[split]["hypotheses"], dense[split]["hypotheses"])
            tests[split] = {"p_value": outcome.p_value, "significant": outcome.significant,
                            "worse": outcome.significant and outcome.mean_difference > 0}
        rows.append({"name": name, "method": summary["method"], "sparsity": summary["sparsity"],
                     "steps": summary["steps"], "wer": {k: v["wer"] for k, v in results.items()},
                     "cer": {k: v["cer"] for k, v in results.items()}, "mapsswe": tests,
                     "train_seconds": summary.get("loop_seconds", 0.0)})
    return {"model": MODEL,
            "settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                         "threshold_lr": args.threshold_lr, "warmup": 0.1, "seed": 0},
            "datasets": {name: len(data) for name, data in sets.items()},
            "rows": rows, "seconds": time.time() - started}


def print_table(results: dict) -> None:
    columns = [*REAL, "real", "test"]
    print(f"{'run':<14}{'sparsity':>9}" + "".join(f"{c:>10}" for c in columns) + "   MAPSSWE real / test")
    for row in results["rows"]:
        cells = "".join(f"{100 * row['wer'][c]:>9.2f}%" for c in columns)
        verdicts = " / ".join(
            "-" if split not in row["mapsswe"] else
            ("worse" if row["mapsswe"][split]["worse"] else "better" if row["mapsswe"][split]["significant"]
             else "same") + f" (p={row['mapsswe'][split]['p_value']:.2g})"
            for split in ("real", "test"))
        print(f"{row['name']:<14}{100 * row['sparsity']:>8.1f}%" + cells + "   " + verdicts)
    print(f"WER after English normalisation; 'real' pools the {sum(results['datasets'][n] for n in REAL)} "
          f"real recordings; 'test' is the first {results['datasets']['test']} built-in test utterances")


def main() -> int:
    args = parse_args()
    if not args.print_only:
        summaries = train_runs(args)
        results = measure(args, summaries)
        atomic_write(os.fspath(args.results), lambda file: file.write(json.dumps(results, indent=2).encode()))
    results = json.loads(Path(args.results).read_text())
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
