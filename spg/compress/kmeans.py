"""k-means: a plain numpy implementation of Lloyd's algorithm with greedy k-means++ seeding,
written to be read.

Reference: arXiv 2606.11836 (parameter clustering for speech models) clusters the parameter
vectors of a layer's units (attention heads or FFN neurons) with k-means and merges the units
of each cluster into one. This module is the k-means; the units, the merge rules and how many
units each module keeps are spg/compress/merging.py, and applying them to a model is
spg/compress/clustering.py.

Only numpy and the standard library are used at run time; scikit-learn is a
test-only reference.
"""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = ["kmeans", "kmeans_plusplus", "add_rows_by_label"]


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
    add_rows_by_label(sums, labels, x)

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


def add_rows_by_label(sums: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
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
