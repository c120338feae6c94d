"""Parameter clustering: merge similar attention heads / FFN neurons with k-means.

Reference: arXiv 2606.11836 (parameter clustering for speech models). The method
clusters the parameter vectors of a layer's units (attention heads or FFN neurons)
with k-means and merges the units of each cluster into one.

This module has two parts:

1. **k-means** (this section): a plain numpy implementation of Lloyd's algorithm
   with greedy k-means++ seeding, written to be read.
2. **Units and merging**: a module's attention heads or FFN neurons as vectors,
   the merge rules that turn cluster labels into fewer units, the structured
   magnitude baseline, and how many units each module keeps (uniform or
   variance-based mixed sparsity). Applying all this to a model lives in
   spg/compress/clustering.py (torch glue) and the model's `rebuild` (building the smaller model).

Only numpy and the standard library are used at run time; scikit-learn is a
test-only reference.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "kmeans", "kmeans_plusplus",
    "MERGE_RULES", "ModuleUnits", "attention_head_units", "attention_weights_from_units",
    "ffn_neuron_units", "ffn_weights_from_units", "merge_units", "cluster_units",
    "largest_norm_units", "kept_units", "weight_variance", "variance_groups", "mixed_kept_units",
    "mixed_kept_units_per_kind", "DEFAULT_MERGE", "largest_indices",
]


# =============================================================================
# Part 1: k-means
# =============================================================================
#
# Choices not specified by the paper (it only says "k-means"):
#
# * Seeding: greedy k-means++ (Arthur & Vassilvitskii 2007, with the greedy
#   variant of scikit-learn: 2 + floor(ln k) candidates per step, keep the one
#   that lowers the potential most). We use it because it is the de-facto
#   standard and makes our results comparable to scikit-learn's KMeans.
# * Arithmetic: everything is computed in float64, whatever the input dtype,
#   because the expansion ||x||^2 - 2 x.c + ||c||^2 loses precision when
#   distances are small compared with the norms (float32 has ~7 digits).
#   Returned centres are float64.
# * Convergence: scikit-learn's definition (total squared centre shift
#   <= tol * mean per-feature variance of x), plus a strict stop when the
#   assignments no longer change (a fixed point of Lloyd's iteration).
# * Empty clusters: re-seeded with the points farthest from their current
#   centres, as scikit-learn does, so that k centres are always returned.

# Upper bound on the size of temporary distance matrices (bytes). Larger
# problems are processed in row chunks so memory stays bounded.
_CHUNK_BYTES = 64 * 2**20

# k-means++ needs the distances from each newly chosen point to all n points.
# When the n x n Gram matrix X X^T fits in this budget we compute it once with a
# single matrix product, which makes seeding much faster than k separate
# (memory-bound) products with X; otherwise we compute the rows on demand.
_GRAM_MAX_BYTES = 256 * 2**20


def _validate(x: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Check the inputs of :func:`kmeans` and return (x as float64, k as int)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array of shape (n, d); got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"x must hold real numbers; got dtype {x.dtype}")
    if isinstance(k, bool):
        raise TypeError("k must be an integer, not bool")
    k = operator.index(k)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n (number of points); got k={k}, n={n}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values; k-means needs finite inputs")
    return x, k


def _row_sq_norms(x: np.ndarray) -> np.ndarray:
    """||x_i||^2 for every row i."""
    return np.einsum("ij,ij->i", x, x)


def _assign(
    x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Assignment (E) step of Lloyd's algorithm.

    Returns, for every point, the index of its nearest centre (ties go to the
    lowest index) and the squared distance to it. Distances use
    ||x||^2 - 2 x.c + ||c||^2 computed with one matrix product per chunk of
    rows, clipped at 0 to remove negative rounding noise.
    """
    n, k = x.shape[0], centers.shape[0]
    c_sq = _row_sq_norms(centers)
    labels = np.empty(n, dtype=np.int64)
    min_sq_dist = np.empty(n, dtype=np.float64)
    rows = max(1, _CHUNK_BYTES // (8 * k))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d = x[start:stop] @ centers.T  # x.c
        d *= -2.0
        d += x_sq[start:stop, None]
        d += c_sq[None, :]
        lab = np.argmin(d, axis=1)
        labels[start:stop] = lab
        min_sq_dist[start:stop] = np.maximum(d[np.arange(stop - start), lab], 0.0)
    return labels, min_sq_dist


def _update_centers(
    x: np.ndarray, labels: np.ndarray, min_sq_dist: np.ndarray, k: int
) -> np.ndarray:
    """Update (M) step of Lloyd's algorithm, with empty-cluster relocation.

    Every centre becomes the mean of the points assigned to it. A cluster that
    received no point is given the point farthest from its current centre
    (``min_sq_dist``), taken out of its old cluster, as in scikit-learn. With
    several empty clusters the farthest, second farthest, ... points are used
    (distinct points; ties go to the lowest point index, so the result is
    deterministic). Not specified by the paper; we additionally never take the
    only point of a cluster, because that would just move the emptiness to
    another cluster (there are always enough points: n >= k).
    """
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    _add_rows_by_label(sums, labels, x)

    empty = np.flatnonzero(counts == 0)
    if empty.size:
        order = np.argsort(-min_sq_dist, kind="stable")  # farthest first
        it = iter(order)
        for j in empty:
            p = next(i for i in it if counts[labels[i]] > 1)
            old = labels[p]
            sums[old] -= x[p]
            counts[old] -= 1
            sums[j] = x[p]
            counts[j] = 1
    return sums / counts[:, None]


def _add_rows_by_label(sums: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
    """sums[j] += sum of the rows x[i] with labels[i] == j (vectorised).

    Sorting by label and using ``np.add.reduceat`` is much faster than
    ``np.add.at`` for large inputs.
    """
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sums[sorted_labels[starts]] += np.add.reduceat(x[order], starts, axis=0)


def _lloyd(
    x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray, max_iter: int, tol_abs: float
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd's algorithm (Lloyd 1982) from the given initial centres.

    Alternates the update step (centres := cluster means) and the assignment
    step (points := nearest centre). Stops when the assignments no longer
    change (strict convergence), when the total squared centre shift is
    <= ``tol_abs``, or after ``max_iter`` update steps. Because each iteration
    ends with an assignment step, the returned labels are always those of the
    returned centres.

    Returns (centers, labels, inertia, n_iter).
    """
    centers = np.array(centers, dtype=np.float64)
    k = centers.shape[0]
    labels, min_sq_dist = _assign(x, x_sq, centers)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        new_centers = _update_centers(x, labels, min_sq_dist, k)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        new_labels, min_sq_dist = _assign(x, x_sq, centers)
        unchanged = np.array_equal(new_labels, labels)
        labels = new_labels
        if unchanged or shift <= tol_abs:
            break
    # The final inertia is recomputed directly (not from the expansion) so that it
    # is exact for the returned centres and labels, e.g. exactly 0 for k = n.
    inertia = float(((x - centers[labels]) ** 2).sum())
    return centers, labels, inertia, n_iter


def _sq_dists_from_points(
    x: np.ndarray, x_sq: np.ndarray, idx: np.ndarray, gram: np.ndarray | None
) -> np.ndarray:
    """Squared distances from the points ``x[idx]`` to all points, shape (len(idx), n).

    Uses the precomputed Gram matrix ``gram = x @ x.T`` when given. The distance
    of each point to itself is set to exactly 0.
    """
    dots = gram[idx] if gram is not None else x[idx] @ x.T
    d = x_sq[idx, None] - 2.0 * dots + x_sq[None, :]
    np.maximum(d, 0.0, out=d)
    d[np.arange(len(idx)), idx] = 0.0
    return d


def kmeans_plusplus(
    x: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy k-means++ seeding; returns the indices (k,) of the chosen points.

    Implements k-means++ (Arthur & Vassilvitskii 2007, "k-means++: the advantages
    of careful seeding") in its greedy form, as in scikit-learn: the first centre
    is a uniformly random point; each further centre is chosen by drawing
    ``n_local_trials`` candidates with probability proportional to D(x)^2 (the
    squared distance to the nearest centre chosen so far) and keeping the
    candidate that minimises the resulting potential sum(D^2). The default
    ``n_local_trials = 2 + floor(ln k)`` is scikit-learn's.

    When all remaining points coincide with chosen centres (potential 0, e.g.
    duplicated data with k > number of distinct points) D^2 sampling is
    impossible; we then take the lowest-index point not yet chosen. Not
    specified by the paper; it is deterministic and keeps the centres distinct
    as indices.

    Raises the same ValueErrors as :func:`kmeans` for invalid ``x`` or ``k``.
    """
    x, k = _validate(x, k)
    n = x.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(k))
    x_sq = _row_sq_norms(x)
    gram = None
    if k > 1 and 8 * n * n <= _GRAM_MAX_BYTES:
        gram = x @ x.T
        x_sq = np.diagonal(gram).copy()  # consistent with gram: D^2(x, x) is exactly 0

    chosen = np.empty(k, dtype=np.int64)
    is_chosen = np.zeros(n, dtype=bool)
    chosen[0] = rng.integers(n)
    is_chosen[chosen[0]] = True
    closest_sq = _sq_dists_from_points(x, x_sq, chosen[:1], gram)[0]

    for c in range(1, k):
        cumulative = np.cumsum(closest_sq)
        potential = cumulative[-1]
        if potential <= 0.0:
            # Every point coincides with a chosen centre: nothing to sample.
            # (closest_sq stays all zero.)
            best = int(np.flatnonzero(~is_chosen)[0])
        else:
            # Sample candidates with probability D^2 / potential. side="right" never
            # returns a zero-weight point; the clip guards against u * potential
            # rounding up to potential.
            last_positive = int(np.searchsorted(cumulative, potential, side="left"))
            draws = rng.uniform(size=n_local_trials) * potential
            candidates = np.minimum(
                np.searchsorted(cumulative, draws, side="right"), last_positive
            )
            cand_sq = _sq_dists_from_points(x, x_sq, candidates, gram)
            np.minimum(closest_sq[None, :], cand_sq, out=cand_sq)
            best_trial = int(np.argmin(cand_sq.sum(axis=1)))
            best = int(candidates[best_trial])
            closest_sq = cand_sq[best_trial]
        chosen[c] = best
        is_chosen[best] = True
    return chosen


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Cluster the rows of ``x`` into ``k`` groups with k-means.

    Greedy k-means++ seeding (:func:`kmeans_plusplus`) followed by Lloyd's
    algorithm (Lloyd 1982, "Least squares quantization in PCM"), repeated
    ``n_init`` times; the run with the lowest inertia is kept (the first one on
    ties). Fully deterministic for a given ``seed`` (numpy ``default_rng``).

    Args:
        x: (n, d) array of real numbers (e.g. one row per FFN unit). Computed in
            float64 whatever the input dtype.
        k: number of clusters, 1 <= k <= n. k may exceed the number of distinct
            points; the extra centres then duplicate points and the inertia is 0.
        n_init: number of restarts with different seedings.
        max_iter: maximum number of Lloyd iterations per restart.
        tol: convergence tolerance relative to the data: stop when the total
            squared centre shift of an iteration is <= tol * mean(var(x, axis=0))
            (scikit-learn's definition). Lloyd also stops as soon as the
            assignments no longer change.
        seed: seed for ``numpy.random.default_rng``.

    Returns:
        centers: (k, d) float64 cluster centres.
        labels: (n,) int64 index of the centre of every point.
        inertia: sum of squared distances of the points to their centres
            (consistent with the returned ``centers`` and ``labels``).

    Raises:
        ValueError: if x is not 2-D, contains NaN/inf, if k is not in [1, n],
            or if n_init, max_iter or tol are out of range.
    """
    x, k = _validate(x, k)
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1; got {n_init}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0; got {tol}")

    rng = np.random.default_rng(seed)
    x_sq = _row_sq_norms(x)
    tol_abs = tol * float(np.var(x, axis=0).mean())

    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(n_init):
        seeds = kmeans_plusplus(x, k, rng)
        centers, labels, inertia, _n_iter = _lloyd(x, x_sq, x[seeds], max_iter, tol_abs)
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia)
    assert best is not None
    return best


# =============================================================================
# Part 2: units, merging, and how many units each module keeps
# =============================================================================
#
# The paper (arXiv 2606.11836) compresses a block's attention and its feed-forward
# network (FFN) separately. Each is a "module" made of N structured units:
#
# * attention head h: the d_h rows of W_q, W_k, W_v that belong to h (and their
#   biases), plus the d_h columns of W_out that belong to h;
# * FFN neuron n: row n of W_fc1 (and bias n), plus column n of W_fc2.
#
# A unit has an INPUT side (what reads the block input: q/k/v rows and biases,
# fc1 row and bias) and an OUTPUT side (what writes the block output: W_out
# columns, W_fc2 column). k-means runs on the concatenation of both sides. The
# out_proj and fc2 biases belong to no unit and are kept unchanged.
#
# Everything here works on numpy arrays (float64); spg/compress/clustering.py converts a
# model's tensors to these arrays and rebuilds the smaller model with
# the model's `rebuild` (spg.compress.interface).

MERGE_RULES: tuple[str, ...] = ("mean", "sum_out", "representative")
DEFAULT_MERGE = "mean"       # the one default of every function here and of spg.compress.clustering


@dataclass
class ModuleUnits:
    """The N units of one module as two float64 matrices with one row per unit.

    input_side: (N, a), the input-side parameters of each unit, flattened;
    output_side: (N, b), the output-side parameters of each unit, flattened.
    """

    input_side: np.ndarray
    output_side: np.ndarray

    def __post_init__(self) -> None:
        self.input_side = np.asarray(self.input_side, dtype=np.float64)
        self.output_side = np.asarray(self.output_side, dtype=np.float64)
        if self.input_side.ndim != 2 or self.output_side.ndim != 2:
            raise ValueError("input_side and output_side must be 2-D (one row per unit)")
        if self.input_side.shape[0] != self.output_side.shape[0]:
            raise ValueError(f"{self.input_side.shape[0]} input sides but "
                             f"{self.output_side.shape[0]} output sides")

    @property
    def num_units(self) -> int:
        return self.input_side.shape[0]

    @property
    def unit_size(self) -> int:
        """Parameters per unit (= parameters removed from the model per dropped unit)."""
        return self.input_side.shape[1] + self.output_side.shape[1]

    def vectors(self) -> np.ndarray:
        """(N, a + b): each unit as one vector, the points k-means clusters."""
        return np.hstack([self.input_side, self.output_side])

    def select(self, indices: np.ndarray) -> "ModuleUnits":
        """The units at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ModuleUnits(self.input_side[indices], self.output_side[indices])


# --- unit layouts -------------------------------------------------------------

def attention_head_units(
    q_weight: np.ndarray, q_bias: np.ndarray,
    k_weight: np.ndarray, k_bias: np.ndarray,
    v_weight: np.ndarray, v_bias: np.ndarray,
    out_weight: np.ndarray, num_heads: int,
) -> ModuleUnits:
    """The heads of one attention module as units (all heads of width d = rows / num_heads).

    Shapes: q/k/v_weight (H*d, D), q/k/v_bias (H*d,), out_weight (D, H*d), heads packed
    (head 0's d rows first). Unit h:
      input side  = [W_q[h] (d*D), b_q[h] (d), W_k[h], b_k[h], W_v[h], b_v[h]]  (row-major),
      output side = W_out[:, h].T flattened (d*D): the column of each value dim in turn.
    """
    rows, hidden = np.shape(q_weight)
    if num_heads < 0 or (num_heads == 0 and rows) or (num_heads and rows % num_heads):
        raise ValueError(f"{rows} query rows cannot be split into {num_heads} equal heads")
    d = rows // num_heads if num_heads else 0

    def per_head(weight: np.ndarray, bias: np.ndarray) -> list[np.ndarray]:
        weight = np.asarray(weight, dtype=np.float64).reshape(num_heads, d * hidden)
        return [weight, np.asarray(bias, dtype=np.float64).reshape(num_heads, d)]

    input_side = np.hstack(per_head(q_weight, q_bias) + per_head(k_weight, k_bias) + per_head(v_weight, v_bias))
    output_side = np.asarray(out_weight, dtype=np.float64).T.reshape(num_heads, d * hidden)
    return ModuleUnits(input_side, output_side)


def attention_weights_from_units(units: ModuleUnits, hidden_size: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`attention_head_units`: {q_weight, q_bias, k_weight, k_bias,
    v_weight, v_bias, out_weight} for the (possibly merged) heads in `units`."""
    heads, output_size = units.output_side.shape
    d = output_size // hidden_size if heads else 0
    if heads and (output_size != d * hidden_size or units.input_side.shape[1] != 3 * d * (hidden_size + 1)):
        raise ValueError("units do not have the attention-head layout for this hidden size")
    weights: dict[str, np.ndarray] = {}
    start = 0
    for name in ("q", "k", "v"):
        weight = units.input_side[:, start:start + d * hidden_size]
        bias = units.input_side[:, start + d * hidden_size:start + d * (hidden_size + 1)]
        weights[f"{name}_weight"] = weight.reshape(heads * d, hidden_size)
        weights[f"{name}_bias"] = bias.reshape(heads * d)
        start += d * (hidden_size + 1)
    weights["out_weight"] = units.output_side.reshape(heads * d, hidden_size).T.copy()
    return weights


def ffn_neuron_units(fc1_weight: np.ndarray, fc1_bias: np.ndarray, fc2_weight: np.ndarray) -> ModuleUnits:
    """The neurons of one FFN as units: input side [W_fc1[n], b_fc1[n]] (D + 1),
    output side W_fc2[:, n] (D). Shapes: fc1_weight (F, D), fc1_bias (F,), fc2_weight (D, F)."""
    fc1_weight = np.asarray(fc1_weight, dtype=np.float64)
    input_side = np.hstack([fc1_weight, np.asarray(fc1_bias, dtype=np.float64).reshape(-1, 1)])
    return ModuleUnits(input_side, np.asarray(fc2_weight, dtype=np.float64).T)


def ffn_weights_from_units(units: ModuleUnits) -> dict[str, np.ndarray]:
    """Inverse of :func:`ffn_neuron_units`: {fc1_weight (K, D), fc1_bias (K,), fc2_weight (D, K)}."""
    return {"fc1_weight": units.input_side[:, :-1].copy(),
            "fc1_bias": units.input_side[:, -1].copy(),
            "fc2_weight": units.output_side.T.copy()}


# --- clustering, merging, magnitude ranking -----------------------------------

def merge_units(units: ModuleUnits, labels: np.ndarray, rule: str = DEFAULT_MERGE, *,
                min_similarity: Optional[float] = None) -> ModuleUnits:
    """Merge the units of every cluster into one unit.

    "mean" and "sum_out" give the new unit's input side the centroid (mean) of the members'
    input sides. The output side is
      * "mean": the centroid as well (every part of the new unit is the centroid: the
        paper's wording);
      * "sum_out": the SUM of the members' output sides. Not specified by the paper; we
        offer it because for near-identical members, whose activations are nearly equal,
        the merged unit then writes what all members together wrote, so the module's
        output is preserved (with "mean" a cluster of m units writes 1/m of it).
    "representative" (ours, not the paper's) merges nothing: the cluster is replaced by its
    member nearest the centroid (Euclidean, on the whole unit vector; ties: lower index),
    unchanged. k-means then serves as a selector of diverse units, where the others drop
    the smallest-norm ones.

    min_similarity (ours): merge a cluster by `rule` only when every member's cosine
    similarity to the cluster's centroid is at least this; other clusters keep their
    representative. None merges every cluster.

    Clusters are numbered by `labels` (0..K-1); the merged units come out in label order.
    A label with no member (possible only if Lloyd stopped on max_iter/tol right after an
    assignment emptied a cluster) gives no unit, so the result may have fewer than K units.
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"merge rule must be one of {MERGE_RULES}; got {rule!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (units.num_units,):
        raise ValueError(f"need one label per unit ({units.num_units}); got shape {labels.shape}")
    if units.num_units == 0:
        return units.select(np.arange(0))
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    input_sums = np.zeros((k, units.input_side.shape[1]))
    output_sums = np.zeros((k, units.output_side.shape[1]))
    _add_rows_by_label(input_sums, labels, units.input_side)
    _add_rows_by_label(output_sums, labels, units.output_side)
    present = counts > 0
    counts = counts[present, None]
    input_side = input_sums[present] / counts
    output_side = output_sums[present] if rule == "sum_out" else output_sums[present] / counts
    if rule != "representative" and min_similarity is None:
        return ModuleUnits(input_side, output_side)
    # the member nearest each centroid, and whether the cluster is similar enough to merge
    vectors = units.vectors()
    centroids = np.hstack([input_sums, output_sums])[present] / counts               # (K, a + b)
    cluster_of = np.cumsum(present) - 1                                               # label -> row
    rows = cluster_of[labels]
    distances = ((vectors - centroids[rows]) ** 2).sum(1)
    representative = np.full(len(centroids), -1)
    for unit in np.lexsort((np.arange(len(labels)), distances)):                     # nearest first
        if representative[rows[unit]] < 0:
            representative[rows[unit]] = unit
    keep_representative = np.ones(len(centroids), dtype=bool)
    if rule != "representative":
        norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(centroids[rows], axis=1)
        cosine = np.where(norms > 0, (vectors * centroids[rows]).sum(1) / np.where(norms > 0, norms, 1), 1.0)
        lowest = np.full(len(centroids), np.inf)
        np.minimum.at(lowest, rows, cosine)
        keep_representative = lowest < min_similarity
    input_side = np.where(keep_representative[:, None], units.input_side[representative], input_side)
    output_side = np.where(keep_representative[:, None], units.output_side[representative], output_side)
    return ModuleUnits(input_side, output_side)


def cluster_units(
    units: ModuleUnits, k: int, *, merge: str = DEFAULT_MERGE, seed: int = 0, n_init: int = 1,
    max_iter: int = 300, tol: float = 1e-4, min_similarity: Optional[float] = None,
) -> tuple[ModuleUnits, np.ndarray, float]:
    """Cluster the N units into k groups with :func:`kmeans` and merge every group.

    Returns (merged units, labels (N,), inertia). k = N returns the units unchanged
    (every unit its own cluster) and k = 0 returns no units, without running k-means.
    n_init, max_iter and tol are :func:`kmeans`'s (n_init=1: not specified by the paper;
    scikit-learn's default for k-means++ seeding).
    """
    n = units.num_units
    if not 0 <= k <= n:
        raise ValueError(f"k must satisfy 0 <= k <= N; got k={k}, N={n}")
    if k == n:
        return units.select(np.arange(n)), np.arange(n, dtype=np.int64), 0.0
    if k == 0:
        return units.select(np.arange(0)), np.full(n, -1, dtype=np.int64), float((units.vectors() ** 2).sum())
    _centers, labels, inertia = kmeans(units.vectors(), k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
    return merge_units(units, labels, merge, min_similarity=min_similarity), labels, inertia


def largest_norm_units(units: ModuleUnits, k: int) -> np.ndarray:
    """Indices (ascending) of the k units whose unit vector has the largest L2 norm: the
    structured magnitude pruning baseline drops the others. Ties go to the lower index."""
    if not 0 <= k <= units.num_units:
        raise ValueError(f"k must satisfy 0 <= k <= N; got k={k}, N={units.num_units}")
    return largest_indices(np.sqrt((units.vectors() ** 2).sum(axis=1)), k)


def largest_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the k largest `scores`; ties go to the lower index."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:k])


# --- how many units each module keeps -----------------------------------------

def kept_units(num_units: int, sparsity: float) -> int:
    """K = round(N * (1 - s)), the paper's number of units a module keeps.

    Rounding half up (so 7.5 -> 8) is not specified by the paper; we use it instead of
    Python's round-half-to-even so that K does not depend on the parity of the integer
    part. The product is first rounded to 9 decimals so that float noise (e.g.
    12 * (1 - 0.375) computed as 7.4999999) does not flip the result."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1]; got {sparsity}")
    return int(math.floor(round(num_units * (1.0 - sparsity), 9) + 0.5))


def weight_variance(*matrices: np.ndarray) -> float:
    """Variance of all entries of the given weight matrices together (one module's weights:
    W_q, W_k, W_v, W_out, or W_fc1, W_fc2). Biases are left out: the paper speaks of the
    variance of the weights. A module whose units were all removed earlier has no weights; its
    variance is 0 by our convention (it keeps 0 units in any group), not NaN."""
    values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in matrices])
    return float(np.var(values)) if values.size else 0.0


def variance_groups(variances: list[float]) -> list[str]:
    """"low" / "mid" / "high" for every module: modules sorted by weight variance and split
    into thirds (np.array_split sizes: when the count is not a multiple of 3 the low, then
    the mid group get the extra module; ties keep the module order)."""
    order = np.argsort(np.asarray(variances, dtype=np.float64), kind="stable")
    groups = [""] * len(variances)
    for name, members in zip(("low", "mid", "high"), np.array_split(order, 3)):
        for m in members:
            groups[int(m)] = name
    return groups


HIGH_VARIANCE_FACTOR = 1.2


def mixed_kept_units_per_kind(num_units: list[int], unit_sizes: list[int], variances: list[float],
                              sparsity: float, kinds: list[str]) -> tuple[list[int], list[str]]:
    """`mixed_kept_units` within each module kind separately (e.g. "heads", "ffn_units"):
    attention modules are ranked against attention modules and FFNs against FFNs, and each
    kind keeps its uniform parameter count. Ours: `mixed_kept_units` ranks all modules
    together, so when one kind's variances are all above the other's (as on the shipped
    model: README.md, `--mixed-per-kind`) it moves budget between kinds."""
    if len(kinds) != len(num_units):
        raise ValueError("kinds needs one entry per module")
    ks, groups = [0] * len(num_units), [""] * len(num_units)
    for kind in dict.fromkeys(kinds):
        members = [m for m, k in enumerate(kinds) if k == kind]
        kind_ks, kind_groups = mixed_kept_units([num_units[m] for m in members], [unit_sizes[m] for m in members],
                                                [variances[m] for m in members], sparsity)
        for m, k, group in zip(members, kind_ks, kind_groups):
            ks[m], groups[m] = k, group
    return ks, groups


def mixed_kept_units(num_units: list[int], unit_sizes: list[int], variances: list[float],
                     sparsity: float) -> tuple[list[int], list[str]]:
    """Variance-based mixed sparsity (arXiv 2606.11836): K per module, and its group.

    With K_base = kept_units(N, s) per module:
      * high-variance third: K = floor(1.2 * K_base), at most N;
      * mid third: K = K_base;
      * low-variance third: together they give up exactly the parameters the high third
        gained, so the model's parameter count equals the uniform setting's.

    How the low third shares the reduction is not specified by the paper; we let every
    low module keep the same fraction f of its K_base (the mirror image of the high
    group's common factor 1.2), f = 1 - gained / (parameters the low group holds at
    K_base), parameters counted as K * unit_size. The real-valued targets f * K_base are
    rounded with error diffusion (each module's rounding error, in parameters, is carried
    into the next one), visiting modules with larger units first so that the last, finest
    adjustments are made with the smallest units: the total then differs from the uniform
    one by at most half a unit of the last module (always within one unit per module).
    If the low group cannot give up enough (f < 0, only at extreme settings) its modules
    keep 0 units and the count exceeds the uniform one; the caller's report shows it.
    """
    if not len(num_units) == len(unit_sizes) == len(variances):
        raise ValueError("num_units, unit_sizes and variances need one entry per module")
    base = [kept_units(n, sparsity) for n in num_units]
    groups = variance_groups(variances)
    ks = list(base)
    gained = 0
    for m, group in enumerate(groups):
        if group == "high":
            ks[m] = min(num_units[m], math.floor(HIGH_VARIANCE_FACTOR * base[m]))
            gained += (ks[m] - base[m]) * unit_sizes[m]
    low = [m for m, group in enumerate(groups) if group == "low"]
    low_budget = sum(base[m] * unit_sizes[m] for m in low)
    fraction = max(0.0, 1.0 - gained / low_budget) if low_budget else 1.0
    carry = 0.0                                   # parameters above target so far
    for m in sorted(low, key=lambda m: (-unit_sizes[m], m)):
        target = fraction * base[m]
        wanted = target - carry / unit_sizes[m]
        ks[m] = min(num_units[m], max(0, math.floor(wanted + 0.5)))
        carry += (ks[m] - target) * unit_sizes[m]
    return ks, groups
