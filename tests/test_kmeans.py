"""Tests for spg.compress.kmeans (scikit-learn is only a reference here)."""

from __future__ import annotations

import numpy as np
import pytest

import spg.compress.kmeans as km
from spg.compress.kmeans import kmeans, kmeans_plusplus

# Two clear groups of 3 points. Group A is centred on (0, 0):
#   (2, 0), (-1, 1), (-1, -1)  -> mean (0, 0); squared distances 4 + 2 + 2 = 8.
# Group B is group A shifted by (10, 10), so its mean is (10, 10) and its SS is 8 too.
# Optimal k=2 inertia, by hand: 8 + 8 = 16.
TWO_GROUPS = np.array(
    [[2, 0], [-1, 1], [-1, -1], [12, 10], [9, 11], [9, 9]], dtype=np.float64
)


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_hand_checked_two_groups() -> None:
    centers, labels, inertia = kmeans(TWO_GROUPS, 2)
    assert inertia == pytest.approx(16.0, abs=1e-12)
    np.testing.assert_allclose(_sorted_rows(centers), [[0, 0], [10, 10]], atol=1e-12)
    assert labels.dtype == np.int64 and labels.shape == (6,)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1
    assert labels[0] != labels[3]


def test_k1_gives_mean_and_total_sum_of_squares() -> None:
    x = np.random.default_rng(1).normal(size=(50, 4))
    centers, labels, inertia = kmeans(x, 1)
    np.testing.assert_allclose(centers, x.mean(axis=0, keepdims=True), atol=1e-12)
    assert np.all(labels == 0)
    assert inertia == pytest.approx(((x - x.mean(axis=0)) ** 2).sum(), rel=1e-12)


def test_k_equals_n_gives_zero_inertia() -> None:
    x = np.random.default_rng(2).normal(size=(30, 3))
    centers, labels, inertia = kmeans(x, 30)
    assert inertia == 0.0
    assert sorted(labels.tolist()) == list(range(30))  # every point its own cluster
    np.testing.assert_array_equal(centers[labels], x)


def test_empty_cluster_gets_farthest_point() -> None:
    x = np.array([[0, 0], [1, 0], [0, 1], [6, 6]], dtype=np.float64)
    x_sq = (x**2).sum(axis=1)
    bad_init = np.array([[0.0, 0.0], [1000.0, 1000.0]])  # centre 1 attracts nobody
    labels, d2 = km._assign(x, x_sq, bad_init)
    assert labels.tolist() == [0, 0, 0, 0]
    new = km._update_centers(x, labels, d2, 2)
    # (6, 6) is farthest from its centre (d^2 = 72): it moves to the empty cluster.
    np.testing.assert_allclose(new, [[1 / 3, 1 / 3], [6, 6]])
    # Full Lloyd from the bad start: (0,0),(1,0),(0,1) around (1/3,1/3) give
    # 2/9 + 5/9 + 5/9 = 4/3.
    centers, labels, inertia, _ = km._lloyd(x, x_sq, bad_init, 300, 0.0)
    assert inertia == pytest.approx(4 / 3)
    assert labels.tolist() == [0, 0, 0, 1]

    # Two empty clusters get two distinct points: (6, 6), then (1, 0) (d^2 = 1, tied
    # with (0, 1); the lower index wins).
    init3 = np.array([[0.0, 0.0], [1000.0, 1000.0], [-1000.0, -1000.0]])
    labels, d2 = km._assign(x, x_sq, init3)
    new = km._update_centers(x, labels, d2, 3)
    np.testing.assert_allclose(new, [[0, 0.5], [6, 6], [1, 0]])


def test_empty_cluster_never_takes_a_singletons_only_point() -> None:
    x = np.array([[0, 0], [10, 0], [11, 0]], dtype=np.float64)
    x_sq = (x**2).sum(axis=1)
    init = np.array([[-3.0, 0.0], [10.5, 0.0], [1000.0, 0.0]])
    labels, d2 = km._assign(x, x_sq, init)
    assert labels.tolist() == [0, 1, 1] and d2[0] == 9.0
    new = km._update_centers(x, labels, d2, 3)
    # (0, 0) is farthest but alone in cluster 0; (10, 0) is taken from cluster 1.
    np.testing.assert_allclose(new, [[0, 0], [11, 0], [10, 0]])


def test_deterministic_per_seed() -> None:
    x = np.random.default_rng(3).normal(size=(200, 8))
    a = kmeans(x, 10, n_init=2, seed=7)
    b = kmeans(x, 10, n_init=2, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    seeds = [kmeans_plusplus(x, 10, np.random.default_rng(s)).tolist() for s in range(3)]
    assert len({tuple(s) for s in seeds}) > 1  # different seeds: different seedings


def test_best_of_n_init_is_kept() -> None:
    x = np.random.default_rng(4).normal(size=(150, 5))
    one = kmeans(x, 12, n_init=1, seed=0)[2]
    five = kmeans(x, 12, n_init=5, seed=0)[2]
    assert five <= one  # the first restart is the n_init=1 run


def test_gram_and_direct_seeding_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(5).normal(size=(120, 6))
    with_gram = kmeans_plusplus(x, 15, np.random.default_rng(0))
    monkeypatch.setattr(km, "_GRAM_MAX_BYTES", 0)  # no Gram matrix: distances row by row
    direct = kmeans_plusplus(x, 15, np.random.default_rng(0))
    np.testing.assert_array_equal(with_gram, direct)
    assert len(set(with_gram.tolist())) == 15


def test_chunked_assignment_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(6).normal(size=(97, 5)).astype(np.float32)
    full = kmeans(x, 9, seed=1)
    monkeypatch.setattr(km, "_CHUNK_BYTES", 8 * 9 * 10)  # 10 rows per chunk
    chunked = kmeans(x, 9, seed=1)
    np.testing.assert_array_equal(full[1], chunked[1])
    np.testing.assert_allclose(full[0], chunked[0])


def test_inertia_close_to_sklearn_on_blobs() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    sk_cluster = pytest.importorskip("sklearn.cluster")
    x, _ = datasets.make_blobs(n_samples=600, centers=8, n_features=10, random_state=0)
    ours = kmeans(x, 8, n_init=3, seed=0)[2]
    ref = sk_cluster.KMeans(n_clusters=8, n_init=3, random_state=0).fit(x).inertia_
    assert ours <= 1.01 * ref


def test_inertia_close_to_sklearn_on_wav2vec2_ffn_units() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sk_cluster = pytest.importorskip("sklearn.cluster")
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        conv_dim=(8,),
        conv_stride=(5,),
        conv_kernel=(10,),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    ffn = transformers.Wav2Vec2Model(config).encoder.layers[0].feed_forward
    # One row per FFN unit: its fc1 row, its fc2 column and its fc1 bias.
    units = torch.cat(
        [
            ffn.intermediate_dense.weight,
            ffn.output_dense.weight.T,
            ffn.intermediate_dense.bias[:, None],
        ],
        dim=1,
    )
    x = units.detach().numpy()
    assert x.shape == (256, 65)
    ours = kmeans(x, 32, n_init=10, seed=0)[2]
    ref = sk_cluster.KMeans(n_clusters=32, n_init=10, random_state=0).fit(x).inertia_
    assert ours <= 1.01 * ref


@pytest.mark.parametrize(
    ("k", "match"),
    [(0, r"k=0, n=5"), (6, r"k=6, n=5"), (-1, r"k=-1, n=5")],
)
def test_bad_k_raises(k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans(np.zeros((5, 2)), k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad: float) -> None:
    x = np.ones((5, 2))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(x, 2)


def test_non_2d_input_raises() -> None:
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.ones(5), 2)


def test_duplicates_k_equal_distinct_points() -> None:
    x = np.tile(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]), (10, 1))
    centers, labels, inertia = kmeans(x, 3)
    assert inertia == 0.0
    np.testing.assert_array_equal(_sorted_rows(centers), [[0, 0], [0, 3], [1, 0]])
    assert np.bincount(labels).tolist() == [10, 10, 10]


@pytest.mark.parametrize("scale", [1.0, 0.1])  # 0.1: non-integers, rounding noise
def test_duplicates_k_above_distinct_points(scale: float) -> None:
    x = scale * np.tile(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]), (10, 1))
    centers, labels, inertia = kmeans(x, 5, n_init=2)
    assert centers.shape == (5, 2) and np.isfinite(centers).all()
    assert labels.min() >= 0 and labels.max() < 5
    assert inertia == pytest.approx(0.0, abs=1e-20)
    assert {tuple(c) for c in np.round(centers / scale, 9)} == {(0, 0), (1, 0), (0, 3)}
