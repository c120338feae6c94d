"""Data-free compression of a real Whisper (tiny.en): WER table, method x sparsity.

The small-scale version of the parameter-clustering paper's Whisper table (arXiv 2606.11836):
no data and no training, only k-means merging of attention heads (encoder self-attention,
decoder self-attention, decoder cross-attention) and FFN neurons, against structured
magnitude pruning (drop the smallest-norm units) at the same per-module sizes.

    python experiments/whisper_cluster.py               # results/ as committed (resumable: --resume)
    python experiments/whisper_cluster.py --print-only  # table and figure of the JSON

Rows, each at 10 %, 20 % and 30 % per-module sparsity (K = round(N (1 - s)) units per module:
tiny.en's 6 heads per attention module become 5, 5, 4):
  heads+ffn  every merge rule (`mean`, the paper's; ours: `sum_out`, `representative`) and
             structured magnitude, each with uniform K, variance-based mixed K ranked over all
             modules (the paper's) and ranked within each module kind (ours); `representative`
             and magnitude also with the exact bias fold of the dropped heads (uniform K);
  ffn        uniform K, FFN neurons only, every head kept: every rule and magnitude.
Datasets: the real recordings in recordings/ (librivox: 5 LibriVox sentences, cards: 5 card
names, beckett: one quotation; "real" pools the 11) and the first --utterances of the built-in
synthetic corpus's test split. Whisper pads every input to a 30 s window, so decoding costs
about 1-3 s per utterance and thread on a CPU; --workers processes (one thread each) share the
rows. The report adds MAPSSWE (alpha 0.05) of every clustering row against structured
magnitude at the same sizes (same units, K and fold), on "real" and on the built-in test.

Writes results/whisper_cluster.json (after every row, so --resume can continue):
    {"model": "whisper-tiny.en", "format": 2,
     "datasets": {name: number of utterances}, "references": {dataset: [normalised text]},
     "dense": {"params": int, "wer": {dataset: float}, "cer": {dataset: float}, "hypotheses": {dataset: [...]}},
     "runs": [{"method": "cluster" | "magnitude", "merge": "mean" | "sum_out" | "representative" | null,
               "mixed": false | true | "per_kind", "fold": bool, "sparsity": float,
               "units": "heads+ffn" | "ffn", "params": int, "wer": {dataset: float}, "cer": {...},
               "hypotheses": {dataset: [...]}, "kept": {module kind: [K per layer]},
               "mapsswe": {"real" | "builtin-test": {"p_value", "significant", "better"}} (clustering rows),
               "forward_time_ratio": compressed / uncompressed forward time (one measurement per shape)}],
     "seconds": total wall time of the measurements (float)}
WER and CER are fractions (0.042 = 4.2 %), computed after spg.text.normalize_english; "real"
is micro-averaged over the 11 recordings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import spg  # noqa: E402
from spg.files import atomic_write  # noqa: E402
from spg.compress.clustering import cluster_compress, plan_kept_units, structured_magnitude_prune  # noqa: E402
from spg.data import read_corpus  # noqa: E402
from spg.wer import error_counts, mapsswe  # noqa: E402
from spg.whisper.evaluation import evaluate_whisper, read_transcription_folder  # noqa: E402

MODEL = "whisper-tiny.en"
FORMAT = 2                 # 1: librivox + the format-1 corpus's test split, no decodings stored
SPARSITIES = (0.1, 0.2, 0.3)
RULES = ("mean", "sum_out", "representative")
MIXES = (False, True, "per_kind")          # uniform K; mixed over all modules (paper); per kind (ours)
FOLDED = ("representative", None)           # the merges also measured with the bias fold (None: magnitude)
REAL = ("librivox", "cards", "beckett")
COMPARED = ("real", "builtin-test")         # the sets of the MAPSSWE tests


def row_specs() -> list[dict]:
    """Every row of the table, in the order they are measured."""
    specs = []
    for units in ("heads+ffn", "ffn"):
        for sparsity in SPARSITIES:
            for method, merges in (("cluster", RULES), ("magnitude", (None,))):
                for merge in merges:
                    for mixed in (MIXES if units == "heads+ffn" else (False,)):
                        folds = (False, True) if units == "heads+ffn" and mixed is False and merge in FOLDED else (False,)
                        for fold in folds:
                            specs.append({"method": method, "merge": merge, "mixed": mixed, "fold": fold,
                                          "sparsity": sparsity, "units": units})
    return specs


def key_of(row: dict) -> tuple:
    return tuple(row[name] for name in ("method", "merge", "mixed", "fold", "sparsity", "units"))


def datasets(count: int) -> dict:
    from spg.corpus import build_corpus
    data = {name: read_transcription_folder(REPO / "recordings" / name) for name in REAL}
    data["builtin-test"] = read_corpus(build_corpus(), "test")[:count]
    return data


def measure(model, data: dict, batch_size: int) -> dict:
    results = {name: evaluate_whisper(model, utterances, batch_size=batch_size) for name, utterances in data.items()}
    real = error_counts(sum((results[n]["references"] for n in REAL), []), sum((results[n]["hypotheses"] for n in REAL), []))
    return {"params": model.num_parameters(),
            "wer": {**{n: r["wer"] for n, r in results.items()}, "real": real.rate},
            "cer": {n: r["cer"] for n, r in results.items()},
            "hypotheses": {n: r["hypotheses"] for n, r in results.items()},
            "references": {n: r["references"] for n, r in results.items()}}


def compress(model, spec: dict):
    ks = None
    if spec["units"] == "ffn":          # K = round(N (1 - s)) FFN neurons per layer; every head kept
        ks = plan_kept_units(model, spec["sparsity"])
        ks.update({kind: full for kind, full in plan_kept_units(model, 0.0).items() if kind.endswith("heads")})
    if spec["method"] == "cluster":
        return cluster_compress(model, spec["sparsity"], merge=spec["merge"], mixed=spec["mixed"], ks=ks,
                                fold_bias=spec["fold"])
    return structured_magnitude_prune(model, spec["sparsity"], mixed=spec["mixed"], ks=ks, fold_bias=spec["fold"])


_WORKER: dict = {}


def _start_worker(count: int) -> None:
    torch.set_num_threads(1)
    _WORKER.update(model=spg.load(MODEL), data=datasets(count))


def measure_row(spec, batch_size: int) -> dict:
    """One row in a worker process (spec None: the uncompressed model)."""
    begin = time.time()
    model, data = _WORKER["model"], _WORKER["data"]
    if spec is None:
        return {**measure(model, data, batch_size), "seconds": time.time() - begin}
    small, report = compress(model, spec)
    return {**spec, **measure(small, data, batch_size), "kept": report["kept"], "seconds": time.time() - begin}


def add_mapsswe(result: dict) -> None:
    """Each clustering row against structured magnitude with the same units, K and fold."""
    magnitude = {(r["mixed"], r["fold"], r["sparsity"], r["units"]): r for r in result["runs"] if r["method"] == "magnitude"}
    references = result["references"]

    def pooled(row: dict, name: str) -> tuple[list, list]:
        names = REAL if name == "real" else (name,)
        return sum((references[n] for n in names), []), sum((row["hypotheses"][n] for n in names), [])

    for row in result["runs"]:
        baseline = magnitude.get((row["mixed"], row["fold"], row["sparsity"], row["units"]))
        if row["method"] != "cluster" or baseline is None or baseline["kept"] != row["kept"]:
            continue
        row["mapsswe"] = {}
        for name in COMPARED:
            refs, ours = pooled(row, name)
            test = mapsswe(refs, ours, pooled(baseline, name)[1], alpha=0.05)
            row["mapsswe"][name] = {"p_value": test.p_value, "significant": test.significant,
                                    "better": "cluster" if row["wer"][name] < baseline["wer"][name] else "magnitude"}


def add_forward_times(result: dict, model) -> None:
    """Each row's forward-time ratio (compressed / uncompressed, spg.experiment.forward_seconds:
    medians of interleaved runs on the same input), measured once per distinct shape: the time
    depends on the kept sizes only, so magnitude pruning to the row's sizes stands in for it."""
    from spg.experiment import forward_seconds
    ratios: dict[str, float] = {}
    for row in result["runs"]:
        shape = json.dumps(row["kept"], sort_keys=True)
        if shape not in ratios:
            small, _ = structured_magnitude_prune(model, row["sparsity"], ks=row["kept"])
            times = forward_seconds({"dense": model, "compressed": small})
            ratios[shape] = times["compressed"] / times["dense"]
        row["forward_time_ratio"] = ratios[shape]


def write_json(path: Path, result: dict) -> None:
    atomic_write(os.fspath(path), lambda file: file.write(json.dumps(result, indent=1).encode()))


def label_of(row: dict) -> str:
    label = f"clustering {row['merge']}" if row["method"] == "cluster" else "structured magnitude"
    label += {False: "", True: ", mixed K", "per_kind": ", mixed K per kind"}[row["mixed"]]
    label += ", bias fold" if row.get("fold") else ""
    return label + (", FFN only" if row.get("units") == "ffn" else "")


def print_table(result: dict) -> None:
    names = [*result["datasets"], "real"]
    print(f"\nWER (%) of {result['model']}, no data and no training; datasets: "
          + ", ".join(f"{n} ({c} utterances)" for n, c in result["datasets"].items())
          + "; MAPSSWE against magnitude at the same sizes: + better, - worse, = no significant difference")
    header = (f"{'method':<46}{'sparsity':>9}{'params':>12}" + "".join(f"{n:>14}" for n in names)
              + f"{'fwd ratio':>10}  vs magnitude")
    print(header)
    print("-" * len(header))
    dense = result["dense"]
    print(f"{'dense (uncompressed)':<46}{'0%':>9}{dense['params']:>12,}"
          + "".join(f"{100 * dense['wer'][n]:>14.2f}" for n in names if n in dense["wer"]))
    for spec in row_specs():
        for row in result["runs"]:
            if key_of(row) == key_of(spec):
                signs = "".join("=" if not t["significant"] else "+" if t["better"] == "cluster" else "-"
                                for t in row.get("mapsswe", {}).values())
                print(f"{label_of(row):<46}{100 * row['sparsity']:>8.0f}%{row['params']:>12,}"
                      + "".join(f"{100 * row['wer'][n]:>14.2f}" for n in names)
                      + f"{row.get('forward_time_ratio', float('nan')):>10.2f}  {signs}")


def write_figure(result: dict, out: Path) -> None:
    """<out>.png: WER on the real recordings against sparsity (experiments/figures.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from figures import plot_whisper_clustering
    plot_whisper_clustering(result, out.with_suffix(".png"))
    print(f"figure written to {out.with_suffix('.png')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=20, help="built-in test utterances (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (default %(default)s)")
    parser.add_argument("--out", default=str(REPO / "results" / "whisper_cluster.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--print-only", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.print_only:
        result = json.loads(out.read_text())
        print_table(result)
        write_figure(result, out)
        return 0

    started = time.time()
    counts = {name: len(utterances) for name, utterances in datasets(args.utterances).items()}
    result = {"model": MODEL, "format": FORMAT, "datasets": counts, "references": None, "dense": None, "runs": [],
              "seconds": 0.0}
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        if (previous.get("model"), previous.get("format"), previous.get("datasets")) == (MODEL, FORMAT, counts):
            result = previous
        else:
            print(f"{out} holds other measurements (model, format or datasets differ): starting again")
    done = {key_of(row) for row in result["runs"]}
    pending = ([None] if result["dense"] is None else []) + [s for s in row_specs() if key_of(s) not in done]
    from tqdm import tqdm
    bar = tqdm(total=len(row_specs()) + 1, initial=len(row_specs()) + 1 - len(pending), desc="whisper rows", unit="row")
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_start_worker, initargs=(args.utterances,)) as pool:
        futures = {pool.submit(measure_row, spec, args.batch_size): spec for spec in pending}
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                spec, row = futures.pop(future), future.result()
                result["seconds"] += row.pop("seconds")
                result["references"] = row.pop("references")
                if spec is None:
                    result["dense"] = row
                else:
                    result["runs"].append(row)
                    bar.write(f"{label_of(row)} {row['sparsity']:g}: WER real {100 * row['wer']['real']:.2f}%, "
                              f"built-in {100 * row['wer']['builtin-test']:.2f}%")
                write_json(out, result)
                bar.update(1)
    bar.close()
    order = [key_of(spec) for spec in row_specs()]
    result["runs"].sort(key=lambda row: order.index(key_of(row)))
    add_mapsswe(result)
    add_forward_times(result, spg.load(MODEL))
    write_json(out, result)
    print_table(result)
    write_figure(result, out)
    print(f"\n{time.time() - started:.0f} s this call ({result['seconds']:.0f} s of measurements in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
