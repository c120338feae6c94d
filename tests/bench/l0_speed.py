"""Benchmark: forward time of an L0-pruned wav2vec2-base against the dense model.

A script, run by hand (pytest does not collect it):

    python tests/bench/l0_speed.py                        # 10 s of audio, 10 rounds, all cores
    OMP_NUM_THREADS=1 python tests/bench/l0_speed.py --threads 1 --rounds 5

The dense model is `preset("wav2vec2-base")` with random weights. The pruned one comes from
random but plausible L0 gates (arXiv 2306.01385, our fine-grained reading; `spg.hardconcrete`),
saturated to 0/1 and turned into a smaller model by `hardconcrete.finalize`: in every block
6-10 of the 12 heads survive, each with 24-56 of its 64 query/key dims and 24-56 of its 64
value dims (drawn independently, so head widths differ and attention takes the padded
path), and the FFN keeps whatever width brings the sparsity of the six prunable layers to
`--sparsity` (default 0.70, the paper's "72 % fewer parameters" regime).

Batch 1, eval mode, torch.inference_mode(); after a warm-up the two models run alternately
(dense, pruned, dense, ...) so both see the same machine load; medians are compared. Also
timed: the transformer encoder alone (cached conv features), since L0 pruning never
touches the conv front end. The last line is ``pruned/dense forward time: R``.

--wer: TODO (needs the trained tiny model `models/tiny-dense.pt` and the SPG/UMP runs, which
have not landed): compare the WER of L0 (`spg.l0.L0Method`), SPG and UMP at the same
sparsity on the built-in corpus. The flag is reserved and exits with this message.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from spg import hardconcrete as hc  # noqa: E402
from spg.model import Wav2Vec2CTC, preset  # noqa: E402


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
    parser.add_argument("--wer", action="store_true", help="TODO: WER of L0 vs SPG vs UMP (see the docstring)")
    args = parser.parse_args()
    if args.wer:
        sys.exit("--wer is a TODO: it needs the trained tiny model (models/tiny-dense.pt) and the SPG/UMP "
                 "runs; see the docstring of tests/bench/l0_speed.py")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    dense = Wav2Vec2CTC(preset("wav2vec2-base")).eval()
    gates = plausible_gates(dense, args.sparsity)
    pruned = hc.finalize(dense, gates).eval()
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
