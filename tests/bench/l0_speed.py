"""Benchmark: forward time of an L0-pruned wav2vec2-base against the dense model.

A script, run by hand (pytest does not collect it):

    python tests/bench/l0_speed.py                        # 10 s of audio, 10 rounds, all cores
    OMP_NUM_THREADS=1 python tests/bench/l0_speed.py --threads 1 --rounds 5

The dense model is `preset("wav2vec2-base")` with random weights. The pruned one comes from
random but plausible L0 gates (arXiv 2306.01385, our fine-grained reading; `spg.compress.hardconcrete`),
saturated to 0/1 and turned into a smaller model by `hardconcrete.finalize`: in every block
6-10 of the 12 heads survive, each with 24-56 of its 64 query/key dims and 24-56 of its 64
value dims (drawn independently, so head widths differ and attention takes the padded
path), and the FFN keeps whatever width brings the sparsity of the six prunable layers to
`--sparsity` (default 0.70, the paper's "72 % fewer parameters" regime).

Batch 1, eval mode, torch.inference_mode(); after a warm-up the two models run alternately
(dense, pruned, dense, ...) so both see the same machine load; medians are compared. Also
timed: the transformer encoder alone (cached conv features), since L0 pruning never
touches the conv front end. The last line is ``pruned/dense forward time: R``.

--wer: instead of timing, print the built-in default's test WER of an L0 run (`train.py
--method l0 --json FILE`, default runs/l0-0.7.json) next to SPG and UMP at the same parameter
count: the runs of the SPG experiment (results/spg_experiment.json,
`experiments/spg_experiment.py`) whose non-zero parameter count is closest to the L0 model's
physical count, their WER averaged over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from spg.compress import hardconcrete as hc  # noqa: E402
from spg.compress import l0  # noqa: E402
from spg.wav2vec2.model import Wav2Vec2CTC, preset  # noqa: E402


def plausible_gates(model: Wav2Vec2CTC, sparsity: float, seed: int = 0) -> hc.L0Gates:
    """Saturated (0/1) gates as described in the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    gates = hc.L0Gates.for_model(model)

    def subset(n: int, low: int, high: int) -> torch.Tensor:
        k = int(torch.randint(low, high + 1, (), generator=generator))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=generator)[:k]] = True
        return keep

    with torch.no_grad():
        for block in gates.blocks:
            width = block.qk_head_dims[0]
            heads = subset(block.num_heads, 6, 10)
            qk = torch.cat([subset(width, 24, 56) for _ in range(block.num_heads)])
            v = torch.cat([subset(width, 24, 56) for _ in range(block.num_heads)])
            for gate, keep in ((block.heads, heads), (block.qk_dims, qk), (block.v_dims, v)):
                gate.log_alpha.copy_(30.0 * (2.0 * keep.float() - 1.0))
        # FFN width: one common fraction of neurons per block, by bisection on the count.
        orders = [torch.randperm(block.ffn.num_units, generator=generator) for block in gates.blocks]

        def set_ffn(fraction: float) -> float:
            for block, order in zip(gates.blocks, orders):
                keep = torch.zeros(block.ffn.num_units, dtype=torch.bool)
                keep[order[:round(fraction * block.ffn.num_units)]] = True
                block.ffn.log_alpha.copy_(30.0 * (2.0 * keep.float() - 1.0))
            return gates.deployed_sparsity()

        low, high = 0.0, 1.0                       # sparsity falls as the kept fraction rises
        for _ in range(30):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if set_ffn(middle) > sparsity else (low, middle)
        set_ffn(low)
    return gates


def compare_wer(l0_path: str, experiment_path: str, split: str) -> None:
    """L0 against the experiment's SPG and UMP runs with the closest non-zero parameter count."""
    for path, how in ((l0_path, "python train.py --method l0 --sparsity 0.7 --ste --json runs/l0-0.7.json"),
                      (experiment_path, "python experiments/spg_experiment.py")):
        if not os.path.exists(path):
            sys.exit(f"{path} does not exist; produce it with `{how}`")
    with open(l0_path) as stream:
        l0 = json.load(stream)
    with open(experiment_path) as stream:
        experiment = json.load(stream)
    params = l0["params_total"]
    rows = [("dense", None, l0["params_dense"], l0["dense_wer"][split], False, 1),
            ("l0" + (" (ste)" if l0.get("compression", {}).get("ste") else ""), l0["sparsity"], params,
             l0["compressed_wer"][split], l0["mapsswe"][split]["significant"] and
             l0["compressed_wer"][split] > l0["dense_wer"][split], 1)]
    for method in ("spg", "ump"):
        candidates = [r for r in experiment["runs"] if r["arm"] == method]
        if not candidates:
            continue
        closest = min(candidates, key=lambda r: abs(r["params_nonzero"] - params))["sparsity"]
        runs = [r for r in candidates if r["sparsity"] == closest]
        worse = sum(r["mapsswe_vs_dense"][split]["significant"] and r["wer"][split] > l0["dense_wer"][split]
                    for r in runs)
        rows.append((method, closest, round(sum(r["params_nonzero"] for r in runs) / len(runs)),
                     sum(r["wer"][split] for r in runs) / len(runs), worse == len(runs), len(runs)))
    print(f"{split} WER on the built-in corpus at about {params / 1e6:.2f}M parameters "
          f"(L0: physically smaller; SPG/UMP: non-zero weights, mean over seeds, {experiment['steps']} steps); "
          "* = significantly worse than dense (every seed)")
    print(f"{'method':<10}{'sparsity':>10}{'parameters':>14}{'WER':>10}{'runs':>6}")
    for name, sparsity, count, wer, worse, n in rows:
        shown = "-" if sparsity is None else f"{100 * sparsity:.1f}%"
        print(f"{name:<10}{shown:>10}{count:>14,}{100 * wer:>9.2f}%{'*' if worse else ' '}{n:>5}")
    print(f"L0/SPG {split} WER: {l0['compressed_wer'][split] / rows[2][3]:.2f}" if len(rows) > 2 else "")


def timed(forward) -> float:
    start = time.perf_counter()
    forward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10 s)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per model (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--sparsity", type=float, default=0.70, help="of the six prunable layers (default 0.70)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wer", action="store_true", help="WER of L0 vs SPG vs UMP (see the docstring)")
    parser.add_argument("--l0-json", default=os.path.join(REPO, "runs", "l0-0.7.json"))
    parser.add_argument("--experiment-json", default=os.path.join(REPO, "results", "spg_experiment.json"))
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    if args.wer:
        compare_wer(args.l0_json, args.experiment_json, args.split)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    dense = Wav2Vec2CTC(preset("wav2vec2-base")).eval()
    gates = plausible_gates(dense, args.sparsity)
    pruned = l0.finalize(dense, gates).eval()
    dense.to(device)
    pruned.to(device)
    config = pruned.config
    print(f"wav2vec2-base, random weights, {args.seconds:g} s of audio, batch 1, {torch.get_num_threads()} threads, "
          f"{args.device}, torch {torch.__version__}")
    print(f"prunable-layer sparsity {gates.deployed_sparsity():.3f} (parameters {dense.num_parameters() / 1e6:.1f}M "
          f"-> {pruned.num_parameters() / 1e6:.1f}M); heads per block {config.layer_num_heads}")
    print(f"FFN widths {config.layer_intermediate_sizes}; block-0 q/k widths {config.layer_qk_head_dims[0]}")

    torch.manual_seed(1)
    waveform = torch.randn(1, int(args.seconds * 16000), device=device)
    with torch.inference_mode():
        features = dense.extract_features(waveform)
        runs = {
            "dense": lambda: dense(waveform), "pruned": lambda: pruned(waveform),                    # noqa: E731
            "dense encoder": lambda: dense(None, features=features),                                  # noqa: E731
            "pruned encoder": lambda: pruned(None, features=features),                                # noqa: E731
        }
        for run in runs.values():                                                                     # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                times[name].append(timed(run))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:<15} median {medians[name] * 1000:8.1f} ms  (min {min(t) * 1000:.1f})")
    print(f"pruned/dense encoder-only time: {medians['pruned encoder'] / medians['dense encoder']:.3f}")
    print(f"pruned/dense forward time: {medians['pruned'] / medians['dense']:.3f}")


if __name__ == "__main__":
    main()
