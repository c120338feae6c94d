"""Benchmark: spg.compress.kmeans.kmeans vs scikit-learn's KMeans on wav2vec2-base-sized FFN units.

A script, run by hand (pytest does not collect it):

    python tests/bench/kmeans_speed.py            # 12 layers (sklearn needs minutes)
    python tests/bench/kmeans_speed.py --layers 2

wav2vec2-base has 12 layers of 3,072 FFN units. Each unit is one vector of
768 (fc1 row) + 768 (fc2 column) + 1 (fc1 bias) = 1,537 numbers, and each layer
is clustered to k = 1,536 units (50 %), with n_init=1 for both methods. The
weights are random Gaussian with the usual 1/sqrt(fan_in) scale (std 0.036 for
fc1 and its bias, 0.018 for fc2), a stand-in for a trained layer's magnitudes;
float32, as stored in a model. Both methods get the same float32 arrays (sklearn
then computes in float32, ours in float64).

Prints per-method total time, the inertia ratio, and last the line
``ours/sklearn k-means time: R``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from spg.compress.kmeans import kmeans  # noqa: E402

HIDDEN = 768
FFN = 3072


def make_layer_units(rng: np.random.Generator) -> np.ndarray:
    """(3072, 1537) float32: [fc1 row | fc2 column | fc1 bias] for every FFN unit."""
    fc1 = rng.standard_normal((FFN, HIDDEN)) / np.sqrt(HIDDEN)
    fc2_cols = rng.standard_normal((FFN, HIDDEN)) / np.sqrt(FFN)
    bias = rng.standard_normal((FFN, 1)) / np.sqrt(HIDDEN)
    return np.hstack([fc1, fc2_cols, bias]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="number of layers (default 12)")
    parser.add_argument("--k", type=int, default=FFN // 2, help="clusters per layer (default 1536)")
    args = parser.parse_args()

    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    layers = [make_layer_units(rng) for _ in range(args.layers)]
    print(f"{args.layers} layer(s) x {layers[0].shape[0]} units x {layers[0].shape[1]} dims, "
          f"k={args.k}, n_init=1")

    ours_time = sk_time = 0.0
    ours_inertia = sk_inertia = 0.0
    for i, x in enumerate(layers):
        t0 = time.perf_counter()
        _, _, inertia = kmeans(x, args.k, n_init=1, seed=0)
        t1 = time.perf_counter()
        km = KMeans(n_clusters=args.k, n_init=1, random_state=0).fit(x)
        t2 = time.perf_counter()
        ours_time += t1 - t0
        sk_time += t2 - t1
        ours_inertia += inertia
        sk_inertia += float(km.inertia_)
        print(f"layer {i:2d}: ours {t1 - t0:6.2f} s  sklearn {t2 - t1:6.2f} s  "
              f"inertia ratio {inertia / km.inertia_:.4f} (sklearn n_iter={km.n_iter_})",
              flush=True)

    print(f"ours total time:    {ours_time:.2f} s")
    print(f"sklearn total time: {sk_time:.2f} s")
    print(f"inertia ours/sklearn (sum over layers): {ours_inertia / sk_inertia:.4f}")
    print(f"ours/sklearn k-means time: {ours_time / sk_time:.2f}")


if __name__ == "__main__":
    main()
