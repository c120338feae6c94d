"""Units and merging: a module's attention heads or FFN neurons as vectors, the merge rules
that turn k-means cluster labels into fewer units, the structured magnitude baseline, and how
many units each module keeps (uniform or variance-based mixed sparsity).

Reference: arXiv 2606.11836 (parameter clustering for speech models). The k-means itself is
spg/compress/kmeans.py; applying all this to a model lives in spg/compress/clustering.py
(torch glue) and the model's `rebuild` (building the smaller model).

Only numpy, the standard library and spg/compress/kmeans.py are used, so this file can be
copied out with kmeans.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from spg.compress.kmeans import add_rows_by_label, kmeans

__all__ = [
    "MERGE_RULES", "DEFAULT_MERGE", "ModuleUnits", "attention_head_units", "attention_weights_from_units",
    "ffn_neuron_units", "ffn_weights_from_units", "merge_units", "cluster_units",
    "largest_norm_units", "largest_indices", "kept_units", "weight_variance", "variance_groups",
    "mixed_kept_units", "mixed_kept_units_per_kind",
]


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
    add_rows_by_label(input_sums, labels, units.input_side)
    add_rows_by_label(output_sums, labels, units.output_side)
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
