"""Benchmark for parameter clustering (arXiv 2606.11836): k-means speed and the speed-up of
the compressed model.

A script, run by hand (pytest does not collect it):

    python tests/bench/cluster_speed.py                       # 1 FFN layer for k-means, 5 rounds
    python tests/bench/cluster_speed.py --kmeans-layers 12 --rounds 10 --threads 2

1. k-means: spg.compress.kmeans.kmeans vs scikit-learn's KMeans on wav2vec2-base-sized FFN units
   (3,072 units of 1,537 numbers per layer, k = 1,536, n_init=1; the random stand-in layers
   of tests/bench/kmeans_speed.py, which runs the same comparison on its own).
2. Forward time: wav2vec2-base (preset "wav2vec2-base", random weights), batch 1, 10 s of
   audio, eval mode, torch.inference_mode(), CPU, dense vs compressed at 30 % and 50 %
   (K = round(N (1 - s)) heads and FFN units in every block). The compressed models come
   from structured magnitude pruning, which gives exactly the shapes clustering gives at the
   same K and needs no k-means run (`--method cluster` uses clustering itself). After a
   warm-up the three models run interleaved (dense, 30 %, 50 %, dense, ...) so that all see
   the same machine load; medians are compared.

Prints details first and, last, the ratio lines:
    ours/sklearn k-means time: R
    compressed/dense forward time at 30%: R
    compressed/dense forward time at 50%: R
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kmeans_speed import make_layer_units  # noqa: E402
from spg.compress.clustering import cluster_compress, structured_magnitude_prune  # noqa: E402
from spg.compress.kmeans import kmeans  # noqa: E402
from spg.wav2vec2.model import Wav2Vec2CTC, preset  # noqa: E402

SPARSITIES = (0.3, 0.5)


def kmeans_ratio(layers: int, k: int) -> float:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    ours_time = sk_time = 0.0
    for i in range(layers):
        x = make_layer_units(rng)
        start = time.perf_counter()
        _, _, inertia = kmeans(x, k, n_init=1, seed=0)
        middle = time.perf_counter()
        fitted = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x)
        end = time.perf_counter()
        ours_time += middle - start
        sk_time += end - middle
        print(f"k-means layer {i}: ours {middle - start:6.2f} s  sklearn {end - middle:6.2f} s  "
              f"inertia ours/sklearn {inertia / fitted.inertia_:.4f}", flush=True)
    return ours_time / sk_time


def forward_ratios(rounds: int, seconds: float, method: str) -> dict[float, float]:
    torch.manual_seed(0)
    dense = Wav2Vec2CTC(preset("wav2vec2-base")).eval()
    models = {0.0: dense}
    for sparsity in SPARSITIES:
        if method == "cluster":
            models[sparsity] = cluster_compress(dense, sparsity)[0]
        else:
            models[sparsity] = structured_magnitude_prune(dense, sparsity)[0]
    for sparsity, model in models.items():
        print(f"s={sparsity:.1f}: {model.num_parameters():,} parameters, heads "
              f"{model.config.block_num_heads(0)}, FFN {model.config.block_intermediate_size(0)} per block")
    waveform = torch.randn(1, int(seconds * 16000))
    times: dict[float, list[float]] = {s: [] for s in models}
    with torch.inference_mode():
        for model in models.values():                         # warm-up
            model(waveform)
        for _ in range(rounds):
            for sparsity, model in models.items():
                start = time.perf_counter()
                model(waveform)
                times[sparsity].append(time.perf_counter() - start)
    for sparsity, values in times.items():
        print(f"s={sparsity:.1f}: median {statistics.median(values) * 1000:8.1f} ms  "
              f"(min {min(values) * 1000:.1f} ms)")
    dense_median = statistics.median(times[0.0])
    return {s: statistics.median(times[s]) / dense_median for s in SPARSITIES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kmeans-layers", type=int, default=1, help="FFN layers to cluster (default 1; 0 skips)")
    parser.add_argument("--k", type=int, default=1536, help="clusters per layer (default 1536)")
    parser.add_argument("--rounds", type=int, default=5, help="timed forward rounds per model (default 5)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10 s)")
    parser.add_argument("--method", choices=("magnitude", "cluster"), default="magnitude",
                        help="how the compressed models are made (same shapes either way)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")

    ratio = kmeans_ratio(args.kmeans_layers, args.k) if args.kmeans_layers > 0 else None
    forward = forward_ratios(args.rounds, args.seconds, args.method)
    if ratio is not None:
        print(f"ours/sklearn k-means time: {ratio:.2f}")
    for sparsity, value in forward.items():
        print(f"compressed/dense forward time at {sparsity:.0%}: {value:.2f}")


if __name__ == "__main__":
    main()
