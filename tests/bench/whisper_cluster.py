"""Data-free compression of a real Whisper (tiny.en): WER table, method x sparsity.

The small-scale version of the parameter-clustering paper's Whisper table (arXiv 2606.11836):
no data and no training, only k-means merging of attention heads (encoder self-attention,
decoder self-attention, decoder cross-attention) and FFN neurons, against structured
magnitude pruning (drop the smallest-norm units) at the same per-module sizes.

    OMP_NUM_THREADS=1 python tests/bench/whisper_cluster.py --utterances 20 --ffn-only   # results/ as committed
    python tests/bench/whisper_cluster.py --print-only                                  # table and figure of the JSON

Methods: clustering with merge `mean` / `sum_out`, uniform K or variance-based mixed K;
structured magnitude with uniform or mixed K; each at 10 %, 20 %, 30 % per-module sparsity
(K = round(N (1 - s)) units per module: tiny.en's 6 heads per attention module become 5, 5, 4).
`--ffn-only` adds the uniform rows with FFN neurons compressed and every head kept
("units": "ffn" in the JSON; the default rows have "units": "heads+ffn").
Datasets: the five LibriVox sentences in tests/data/librivox (real recorded speech), and the
first N utterances of the built-in synthetic corpus's test split (synthesised on first use).
Whisper pads every input to a 30 s window, so decoding costs about 1-3 s per utterance and
thread on a CPU: with --utterances 20, the 19 models x 25 utterances took 36 minutes on one
busy core (a training job shared the machine), the 9 --ffn-only rows about as long again.

Writes results/whisper_cluster.json (after every run, so --resume can continue):
    {"model": "whisper-tiny.en",
     "datasets": {name: number of utterances},
     "dense": {"params": int, "wer": {dataset: float}, "cer": {dataset: float}},
     "runs": [{"method": "cluster" | "magnitude", "merge": "mean" | "sum_out" | null,
               "mixed": bool, "sparsity": float, "units": "heads+ffn" | "ffn", "params": int,
               "wer": {dataset: float}, "cer": {dataset: float}, "kept": {module kind: [K per layer]}}],
     "seconds": total wall time of the measurements (float)}
WER and CER are fractions (0.042 = 4.2 %), computed after spg.text.normalize_english.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import spg  # noqa: E402
from spg.checkpoint import atomic_write  # noqa: E402
from spg.data import read_corpus  # noqa: E402
from spg.compress.clustering import cluster_compress, plan_kept_units, structured_magnitude_prune  # noqa: E402
from spg.whisper.evaluation import evaluate_whisper, read_transcription_folder  # noqa: E402

MODEL = "whisper-tiny.en"
SPARSITIES = (0.1, 0.2, 0.3)
# (method, merge, mixed), in table order
METHODS = [("cluster", "mean", False), ("cluster", "mean", True), ("cluster", "sum_out", False),
           ("cluster", "sum_out", True), ("magnitude", None, False), ("magnitude", None, True)]
# With --ffn-only as well: the same at uniform K, FFN neurons only (every head kept).
FFN_ONLY_METHODS = [("cluster", "mean", False), ("cluster", "sum_out", False), ("magnitude", None, False)]


def datasets(count: int) -> dict:
    from spg.corpus import build_corpus
    return {"librivox": read_transcription_folder(REPO / "tests" / "data" / "librivox"),
            "builtin-test": read_corpus(build_corpus(), "test")[:count]}


def measure(model, data: dict, batch_size: int) -> dict:
    results = {name: evaluate_whisper(model, utterances, batch_size=batch_size) for name, utterances in data.items()}
    return {"params": model.num_parameters(), "wer": {n: r["wer"] for n, r in results.items()},
            "cer": {n: r["cer"] for n, r in results.items()}}


def compress(model, method: str, merge, mixed: bool, sparsity: float, units: str):
    ks = None
    if units == "ffn":                  # K = round(N (1 - s)) FFN neurons per layer; every head kept
        ks = plan_kept_units(model, sparsity)
        ks.update({kind: full for kind, full in plan_kept_units(model, 0.0).items() if kind.endswith("heads")})
    if method == "cluster":
        return cluster_compress(model, sparsity, merge=merge, mixed=mixed, ks=ks)
    return structured_magnitude_prune(model, sparsity, mixed=mixed, ks=ks)


def write_json(path: Path, result: dict) -> None:
    atomic_write(os.fspath(path), lambda file: file.write(json.dumps(result, indent=1).encode()))


def print_table(result: dict) -> None:
    names = list(result["datasets"])
    print(f"\nWER (%) of {result['model']}, no data and no training; datasets: "
          + ", ".join(f"{n} ({c} utterances)" for n, c in result["datasets"].items()))
    header = f"{'method':<34}{'sparsity':>9}{'params':>12}" + "".join(f"{n:>14}" for n in names)
    print(header)
    print("-" * len(header))
    dense = result["dense"]
    print(f"{'dense (uncompressed)':<34}{'0%':>9}{dense['params']:>12,}"
          + "".join(f"{100 * dense['wer'][n]:>14.2f}" for n in names))
    rows = [(units, m) for units, methods in (("heads+ffn", METHODS), ("ffn", FFN_ONLY_METHODS)) for m in methods]
    for units, (method, merge, mixed) in rows:
        label = (f"clustering {merge}" if method == "cluster" else "structured magnitude") + (", mixed" if mixed else "")
        label += ", FFN only" if units == "ffn" else ""
        for run in result["runs"]:
            if (run["method"], run["merge"], run["mixed"], run.get("units", "heads+ffn")) == (method, merge, mixed, units):
                print(f"{label:<34}{100 * run['sparsity']:>8.0f}%{run['params']:>12,}"
                      + "".join(f"{100 * run['wer'][n]:>14.2f}" for n in names))

def write_figure(result: dict, out: Path) -> None:
    """<out>.png: WER on the real sentences against sparsity (tests/bench/figures.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from figures import plot_whisper_clustering
    plot_whisper_clustering(result, out.with_suffix(".png"))
    print(f"figure written to {out.with_suffix('.png')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=50, help="built-in test utterances (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "results" / "whisper_cluster.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--ffn-only", action="store_true",
                        help="also measure FFN-only compression (every attention head kept)")
    parser.add_argument("--print-only", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.print_only:
        print_table(json.loads(out.read_text()))
        write_figure(json.loads(out.read_text()), out)
        return 0

    started = time.time()
    data = datasets(args.utterances)
    counts = {name: len(utterances) for name, utterances in data.items()}
    result = {"model": MODEL, "datasets": counts, "dense": None, "runs": [], "seconds": 0.0}
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        if previous.get("model") == MODEL and previous.get("datasets") == counts:
            result = previous
    model = spg.load(MODEL)
    if result["dense"] is None:
        begin = time.time()
        result["dense"] = measure(model, data, args.batch_size)
        result["seconds"] = time.time() - begin
        print(f"dense: {result['dense']}", flush=True)
        write_json(out, result)
    for run in result["runs"]:
        run.setdefault("units", "heads+ffn")
    done = {(r["method"], r["merge"], r["mixed"], r["sparsity"], r["units"]) for r in result["runs"]}
    # Order of the measurements: structured magnitude with mixed K (the least asked-for row) last.
    order = sorted(((s, m, "heads+ffn") for s in SPARSITIES for m in METHODS),
                   key=lambda run: run[1] == ("magnitude", None, True))
    if args.ffn_only:
        order += [(s, m, "ffn") for s in SPARSITIES for m in FFN_ONLY_METHODS]
    for sparsity, (method, merge, mixed), units in order:
        if (method, merge, mixed, sparsity, units) in done:
            continue
        begin = time.time()
        small, report = compress(model, method, merge, mixed, sparsity, units)
        run = {"method": method, "merge": merge, "mixed": mixed, "sparsity": sparsity, "units": units,
               **measure(small, data, args.batch_size), "kept": report["kept"]}
        result["runs"].append(run)
        result["seconds"] = result.get("seconds", 0.0) + time.time() - begin
        write_json(out, result)
        print(f"{method} {merge} mixed={mixed} {sparsity:g}: params {run['params']:,} WER "
              + ", ".join(f"{n} {100 * w:.2f}%" for n, w in run["wer"].items())
              + f" ({time.time() - begin:.0f} s)", flush=True)
    print_table(result)
    write_figure(result, out)
    print(f"\n{time.time() - started:.0f} s this call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
