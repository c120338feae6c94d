"""Tests for parameter clustering (spg.compress.merging and spg.compress.clustering, arXiv 2606.11836)
and its structured magnitude pruning baseline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import spg
from spg.compress import merging
from spg.compress.clustering import cluster_compress, plan_kept_units, structured_magnitude_prune
from spg.wav2vec2 import surgery
from test_surgery import HEAD_DIM, logits, tiny_model

HIDDEN, HEADS, FFN = 32, 4, 24
ATTENTION_UNIT = 4 * HEAD_DIM * HIDDEN + 3 * HEAD_DIM       # q, k, v rows + biases, out columns
FFN_UNIT = 2 * HIDDEN + 1                                   # fc1 row + bias, fc2 column


# --- K -------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "s", "k"), [
    (12, 0.3, 8), (12, 0.5, 6), (3072, 0.3, 2150), (3072, 0.5, 1536), (12, 0.0, 12), (12, 1.0, 0),
    (12, 0.625, 5),     # 4.5 rounds half up
    (12, 0.375, 8),     # 7.5 (7.499999... in floating point) rounds half up
])
def test_kept_units_formula(n: int, s: float, k: int) -> None:
    assert merging.kept_units(n, s) == k


def test_kept_units_rejects_bad_sparsity() -> None:
    with pytest.raises(ValueError):
        merging.kept_units(12, 1.5)


# --- unit layouts and merging --------------------------------------------------------

def test_unit_layouts_round_trip() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)) for _ in range(3))
    qb, kb, vb = (rng.normal(size=HEADS * HEAD_DIM) for _ in range(3))
    out = rng.normal(size=(HIDDEN, HEADS * HEAD_DIM))
    units = merging.attention_head_units(q, qb, k, kb, v, vb, out, HEADS)
    assert units.input_side.shape == (HEADS, 3 * HEAD_DIM * (HIDDEN + 1))
    assert units.unit_size == ATTENTION_UNIT
    # Head 1 = its rows of q (first) and its columns of out.
    np.testing.assert_array_equal(units.input_side[1, :HEAD_DIM * HIDDEN], q[HEAD_DIM:2 * HEAD_DIM].ravel())
    np.testing.assert_array_equal(units.output_side[1], out[:, HEAD_DIM:2 * HEAD_DIM].T.ravel())
    back = merging.attention_weights_from_units(units, HIDDEN)
    for name, value in dict(q_weight=q, q_bias=qb, k_weight=k, k_bias=kb, v_weight=v, v_bias=vb,
                            out_weight=out).items():
        np.testing.assert_array_equal(back[name], value)

    fc1, b1, fc2 = rng.normal(size=(FFN, HIDDEN)), rng.normal(size=FFN), rng.normal(size=(HIDDEN, FFN))
    units = merging.ffn_neuron_units(fc1, b1, fc2)
    assert units.unit_size == FFN_UNIT
    back = merging.ffn_weights_from_units(units)
    np.testing.assert_array_equal(back["fc1_weight"], fc1)
    np.testing.assert_array_equal(back["fc1_bias"], b1)
    np.testing.assert_array_equal(back["fc2_weight"], fc2)


def test_merge_rules_by_hand() -> None:
    units = merging.ModuleUnits(input_side=[[0.0, 2.0], [2.0, 4.0], [5.0, 5.0]],
                               output_side=[[1.0], [3.0], [7.0]])
    mean = merging.merge_units(units, np.array([0, 0, 1]), "mean")
    np.testing.assert_array_equal(mean.input_side, [[1.0, 3.0], [5.0, 5.0]])
    np.testing.assert_array_equal(mean.output_side, [[2.0], [7.0]])
    summed = merging.merge_units(units, np.array([0, 0, 1]), "sum_out")
    np.testing.assert_array_equal(summed.input_side, [[1.0, 3.0], [5.0, 5.0]])
    np.testing.assert_array_equal(summed.output_side, [[4.0], [7.0]])
    with pytest.raises(ValueError, match="merge rule"):
        merging.merge_units(units, np.array([0, 0, 1]), "median")


# --- merging exact duplicates reproduces the model -----------------------------------

@torch.no_grad()
def duplicated_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(half, dup): `half` keeps heads 0-1 and FFN units 0-11 of a random model; `dup` has
    all 4 heads / 24 units, where heads 2-3 copy heads 0-1 and units 12-23 copy units 0-11,
    and every copy's output columns are halved, so dup computes exactly what half computes."""
    dup = tiny_model(seed=3)
    for layer in dup.encoder.layers:
        a, f = layer.attention, layer.feed_forward
        first, second = slice(0, 2 * HEAD_DIM), slice(2 * HEAD_DIM, 4 * HEAD_DIM)
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            proj.weight[second] = proj.weight[first]
            proj.bias[second] = proj.bias[first]
        a.out_proj.weight[:, second] = a.out_proj.weight[:, first]
        f.intermediate_dense.weight[12:] = f.intermediate_dense.weight[:12]
        f.intermediate_dense.bias[12:] = f.intermediate_dense.bias[:12]
        f.output_dense.weight[:, 12:] = f.output_dense.weight[:, :12]
    half = surgery.keep_units(dup, heads={b: [0, 1] for b in range(3)}, ffn_units={b: range(12) for b in range(3)})
    for layer in dup.encoder.layers:
        layer.attention.out_proj.weight.mul_(0.5)
        layer.feed_forward.output_dense.weight.mul_(0.5)
    return half, dup


def test_sum_out_merging_of_exact_duplicates_is_exact() -> None:
    half, dup = duplicated_model()
    reference = logits(dup)
    torch.testing.assert_close(logits(half), reference, atol=1e-5, rtol=0)
    ks = {"heads": [2, 2, 2], "ffn_units": [12, 12, 12]}
    merged, report = cluster_compress(dup, 0.5, merge="sum_out", ks=ks)
    assert merged.config.layer_num_heads == [2, 2, 2] and merged.config.layer_intermediate_sizes == [12, 12, 12]
    assert report["inertia"]["ffn_units"] == [0.0, 0.0, 0.0]
    torch.testing.assert_close(logits(merged), reference, atol=1e-5, rtol=0)
    # K = round(N (1 - 0.5)) gives the same K here.
    uniform, _ = cluster_compress(dup, 0.5, merge="sum_out")
    torch.testing.assert_close(logits(uniform), reference, atol=1e-5, rtol=0)
    # "mean" keeps the halved output columns, so it does not reproduce the model.
    mean, _ = cluster_compress(dup, 0.5, merge="mean", ks=ks)
    assert (logits(mean) - reference).abs().max() > 1e-3


def test_cluster_compress_record_and_round_trip(tmp_path) -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    new, report = cluster_compress(model, 0.3, merge="mean", seed=1)
    for key, value in model.state_dict().items():          # the input is not modified
        assert torch.equal(value, before[key])
    assert new.compression == report
    assert report["method"] == "parameter_clustering" and report["merge"] == "mean"
    assert report["sparsity"] == 0.3 and report["mixed"] is False and report["seed"] == 1
    assert report["kept"] == {"heads": [3, 3, 3], "ffn_units": [17, 17, 17]}      # round(4*0.7), round(24*0.7)
    assert report["kept"] == plan_kept_units(model, 0.3)
    assert report["params_before"] == model.num_parameters()
    assert report["params_after"] == model.num_parameters() - 3 * (ATTENTION_UNIT + 7 * FFN_UNIT)
    assert report["params_after"] == new.num_parameters()
    spg.save(new, tmp_path / "clustered.pt")
    loaded = spg.load(tmp_path / "clustered.pt")
    assert loaded.compression == report
    torch.testing.assert_close(logits(loaded), logits(new), atol=0, rtol=0)


# --- mixed sparsity ------------------------------------------------------------------

def test_mixed_kept_units_rule_and_parameter_count() -> None:
    """wav2vec2-base shapes: 12 attention modules (12 heads of 196,800 params), 12 FFN modules
    (3,072 units of 1,537); variances are random, so the thirds mix both kinds."""
    rng = np.random.default_rng(0)
    num_units = [12, 3072] * 12
    unit_sizes = [4 * 64 * 768 + 3 * 64, 2 * 768 + 1] * 12
    for sparsity in (0.1, 0.3, 0.5, 0.7):
        variances = rng.uniform(size=24).tolist()
        ks, groups = merging.mixed_kept_units(num_units, unit_sizes, variances, sparsity)
        base = [merging.kept_units(n, sparsity) for n in num_units]
        assert groups.count("low") == groups.count("mid") == groups.count("high") == 8
        order = np.argsort(variances)
        assert {groups[m] for m in order[:8]} == {"low"} and {groups[m] for m in order[16:]} == {"high"}
        for m, group in enumerate(groups):
            if group == "high":
                assert ks[m] == min(num_units[m], int(np.floor(1.2 * base[m])))
            elif group == "mid":
                assert ks[m] == base[m]
            else:
                assert 0 <= ks[m] <= base[m]
        uniform = sum(k * p for k, p in zip(base, unit_sizes))
        mixed = sum(k * p for k, p in zip(ks, unit_sizes))
        assert abs(mixed - uniform) <= sum(unit_sizes)       # the spec: one unit per module
        smallest_low_unit = min(p for p, g in zip(unit_sizes, groups) if g == "low")
        assert abs(mixed - uniform) <= smallest_low_unit / 2  # what error diffusion achieves


def test_mixed_model_has_the_uniform_parameter_count() -> None:
    model = tiny_model()
    with torch.no_grad():                        # spread the module variances
        for block, layer in enumerate(model.encoder.layers):
            layer.attention.q_proj.weight.mul_(1 + block)
            layer.feed_forward.intermediate_dense.weight.mul_(3 - block)
    uniform, uniform_report = structured_magnitude_prune(model, 0.5)
    for compress in (structured_magnitude_prune, cluster_compress):
        mixed, report = compress(model, 0.5, mixed=True)
        assert report["mixed"] is True and report["kept"] != uniform_report["kept"]
        assert set(report["variance_group"]["heads"] + report["variance_group"]["ffn_units"]) == \
            {"low", "mid", "high"}
        assert abs(mixed.num_parameters() - uniform.num_parameters()) <= 3 * (ATTENTION_UNIT + FFN_UNIT)


# --- structured magnitude baseline ---------------------------------------------------

def test_largest_norm_units() -> None:
    units = merging.ModuleUnits(input_side=[[1.0], [5.0], [0.0], [3.0]], output_side=[[0.0], [0.0], [4.0], [0.0]])
    assert merging.largest_norm_units(units, 2).tolist() == [1, 2]      # norms 1, 5, 4, 3
    assert merging.largest_norm_units(units, 0).tolist() == []


def test_structured_magnitude_keeps_largest_norm_units() -> None:
    model = tiny_model()
    with torch.no_grad():                         # make head 2 and FFN units 3, 7 of block 1 large
        a, f = model.encoder.layers[1].attention, model.encoder.layers[1].feed_forward
        rows = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            proj.weight[rows] *= 10
        a.out_proj.weight[:, rows] *= 10
        f.intermediate_dense.weight[[3, 7]] *= 10
        f.output_dense.weight[:, [3, 7]] *= 10
    pruned, report = structured_magnitude_prune(model, 0.9)     # keeps round(0.4) = 0 heads, round(2.4) = 2 units
    assert report["kept"] == {"heads": [0, 0, 0], "ffn_units": [2, 2, 2]}
    largest = {}
    for block, layer in enumerate(model.encoder.layers):
        fc1, fc2 = layer.feed_forward.intermediate_dense, layer.feed_forward.output_dense
        norms = torch.cat([fc1.weight, fc1.bias[:, None], fc2.weight.T], dim=1).norm(dim=1)
        largest[block] = sorted(norms.topk(2).indices.tolist())
    assert largest[1] == [3, 7]
    expected = surgery.keep_units(model, heads={b: [] for b in range(3)}, ffn_units=largest)
    torch.testing.assert_close(logits(pruned), logits(expected), atol=0, rtol=0)
    pruned, _ = structured_magnitude_prune(model, 0.0, ks={"heads": [4, 1, 4], "ffn_units": [24, 24, 24]})
    assert torch.equal(pruned.encoder.layers[1].attention.q_proj.weight, a.q_proj.weight[rows])
    assert pruned.compression["method"] == "structured_magnitude"


def test_compressing_an_already_pruned_model() -> None:
    """Blocks with zero heads or zero FFN units stay valid; an earlier record is kept."""
    model = tiny_model()
    pruned = surgery.keep_units(model, heads={1: []}, ffn_units={2: []})
    pruned.compression = {"method": "earlier"}
    again, report = cluster_compress(pruned, 0.5)
    assert report["kept"] == {"heads": [2, 0, 2], "ffn_units": [12, 12, 0]}
    assert again.compression["previous"] == {"method": "earlier"}
    assert torch.isfinite(logits(again)).all()


def test_one_default_merge_rule_everywhere():
    """Issue 16, item 4: merge_units, cluster_units, cluster_compress and train.py agree."""
    import inspect

    import train
    from spg.compress import clustering
    assert inspect.signature(merging.merge_units).parameters["rule"].default == merging.DEFAULT_MERGE
    assert inspect.signature(merging.cluster_units).parameters["merge"].default == merging.DEFAULT_MERGE
    assert inspect.signature(clustering.cluster_compress).parameters["merge"].default == merging.DEFAULT_MERGE
    assert train.parse_args(["--method", "cluster", "--sparsity", "0.3"]).merge == merging.DEFAULT_MERGE == "mean"


# --- issue 16: the variants labelled as ours ------------------------------------------

def test_representative_rule_by_hand_and_exact_on_duplicates() -> None:
    """The member nearest the centroid is kept unchanged (ties: lower index); on clusters of
    exact duplicates it equals every other rule's unit."""
    units = merging.ModuleUnits(input_side=[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [9.0, 9.0]],
                               output_side=[[0.0], [1.0], [2.0], [5.0]])
    chosen = merging.merge_units(units, np.array([0, 0, 0, 1]), "representative")
    # cluster 0's centroid is (4/3, 0 | 1): unit 1 (1, 0 | 1) is nearest
    np.testing.assert_array_equal(chosen.input_side, [[1.0, 0.0], [9.0, 9.0]])
    np.testing.assert_array_equal(chosen.output_side, [[1.0], [5.0]])
    tie = merging.merge_units(merging.ModuleUnits([[0.0], [2.0]], [[0.0], [0.0]]), np.array([0, 0]), "representative")
    np.testing.assert_array_equal(tie.input_side, [[0.0]])               # both at distance 1: the lower index
    duplicates = merging.ModuleUnits(input_side=[[1.0, 2.0], [1.0, 2.0], [4.0, 1.0]], output_side=[[3.0], [3.0], [2.0]])
    labels = np.array([0, 0, 1])
    for rule in ("mean", "representative"):
        merged = merging.merge_units(duplicates, labels, rule)
        np.testing.assert_array_equal(merged.input_side, [[1.0, 2.0], [4.0, 1.0]])
        np.testing.assert_array_equal(merged.output_side, [[3.0], [2.0]])


def test_min_similarity_merges_only_tight_clusters() -> None:
    units = merging.ModuleUnits(input_side=[[1.0, 0.0], [1.0, 0.01], [1.0, 0.0], [0.0, 1.0]],
                               output_side=[[1.0], [1.0], [1.0], [1.0]])
    labels = np.array([0, 0, 1, 1])      # cluster 0: nearly parallel; cluster 1: orthogonal members
    merged = merging.merge_units(units, labels, "mean", min_similarity=0.99)
    np.testing.assert_allclose(merged.input_side[0], [1.0, 0.005])       # merged (mean)
    np.testing.assert_array_equal(merged.input_side[1], [1.0, 0.0])      # kept its representative (tie: lower index)
    everything = merging.merge_units(units, labels, "mean")
    np.testing.assert_allclose(everything.input_side[1], [0.5, 0.5])


def test_fold_value_bias_keeps_the_attention_output_on_a_zero_input() -> None:
    """With heads dropped (structured magnitude) or merged (clustering), the attention output
    on a zero input equals the unpruned one exactly when the value-bias constant is folded,
    and differs without the fold."""
    model = tiny_model().eval()
    zeros = torch.zeros(2, 5, 32)
    for compress in (lambda fold: structured_magnitude_prune(model, 0.5, fold_bias=fold),
                     lambda fold: cluster_compress(model, 0.5, fold_bias=fold)):
        folded, _ = compress(True)
        plain, _ = compress(False)
        for block in range(3):
            with torch.no_grad():
                reference = model.encoder.layers[block].attention(zeros)
                torch.testing.assert_close(folded.encoder.layers[block].attention(zeros), reference,
                                           rtol=0, atol=1e-6)
                assert (plain.encoder.layers[block].attention(zeros) - reference).abs().max() > 1e-3


def test_mixed_per_kind_keeps_each_kinds_uniform_budget() -> None:
    """Ranked within each kind, the high-variance third of each kind gains 1.2x and the low
    third pays for it inside the same kind: each kind's parameter count stays (within one
    unit per module) at the uniform one."""
    num_units = [10, 10, 10, 100, 100, 100]
    sizes = [400, 400, 400, 10, 10, 10]
    variances = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]      # every FFN above every head: ranked together,
    kinds = ["heads"] * 3 + ["ffn_units"] * 3           # the heads would only pay
    ks, groups = merging.mixed_kept_units_per_kind(num_units, sizes, variances, 0.5, kinds)
    assert groups == ["low", "mid", "high"] * 2
    for members in (range(3), range(3, 6)):
        uniform = sum(merging.kept_units(num_units[m], 0.5) * sizes[m] for m in members)
        assert abs(sum(ks[m] * sizes[m] for m in members) - uniform) <= max(sizes[m] for m in members)
    together, _ = merging.mixed_kept_units(num_units, sizes, variances, 0.5)
    assert together[:3] != ks[:3]                      # ranked together, the split between kinds moves


def test_structured_magnitude_to_shapes_hits_exactly_the_requested_sizes() -> None:
    """Issue 16, item 1: any per-module structure (heads, their query/key and value widths, FFN
    neurons) is reproduced exactly, by norm; the model stays consistent (its forward runs)."""
    from spg.compress.clustering import module_shapes, structured_magnitude_to_shapes
    model = tiny_model().eval()
    shapes = module_shapes(model)
    assert shapes["encoder.layers.0.attention"] == {"qk_head_dims": [HEAD_DIM] * 4, "v_head_dims": [HEAD_DIM] * 4}
    target = dict(shapes)
    target["encoder.layers.0.attention"] = {"qk_head_dims": [3, 8], "v_head_dims": [5, 1]}
    target["encoder.layers.1.attention"] = {"qk_head_dims": [], "v_head_dims": []}
    target["encoder.layers.2.feed_forward"] = {"units": 7}
    pruned, record = structured_magnitude_to_shapes(model, target)
    got = module_shapes(pruned)
    assert sorted(got["encoder.layers.0.attention"]["qk_head_dims"]) == [3, 8]
    assert sorted(got["encoder.layers.0.attention"]["v_head_dims"]) == [1, 5]
    assert got["encoder.layers.1.attention"] == {"qk_head_dims": [], "v_head_dims": []}
    assert got["encoder.layers.2.feed_forward"] == {"units": 7}
    assert got["encoder.layers.2.attention"] == shapes["encoder.layers.2.attention"]
    kept = sum(linear.weight.numel() for _, linear in pruned.prunable_linears())
    total = sum(linear.weight.numel() for _, linear in model.prunable_linears())
    assert record["sparsity"] == pytest.approx(1 - kept / total) and record["sparsity"] > 0
    assert torch.isfinite(logits(pruned)).all()
    # the strongest head gets the widest budget, and inside it the largest-norm dims survive
    head_norms = np.linalg.norm(merging.attention_head_units(
        *[t.detach().double().numpy() for t in (model.encoder.layers[0].attention.q_proj.weight,
                                                 model.encoder.layers[0].attention.q_proj.bias,
                                                 model.encoder.layers[0].attention.k_proj.weight,
                                                 model.encoder.layers[0].attention.k_proj.bias,
                                                 model.encoder.layers[0].attention.v_proj.weight,
                                                 model.encoder.layers[0].attention.v_proj.bias,
                                                 model.encoder.layers[0].attention.out_proj.weight)], 4).vectors(), axis=1)
    strongest = int(np.argmax(head_norms))
    attention = model.encoder.layers[0].attention
    columns = slice(strongest * HEAD_DIM, (strongest + 1) * HEAD_DIM)
    score = (attention.v_proj.weight[columns].square().sum(1) + attention.v_proj.bias[columns].square()
             + attention.out_proj.weight[:, columns].square().sum(0))
    expected = attention.v_proj.weight[columns][score.argsort(descending=True)[:5].sort().values]
    widths = module_shapes(pruned)["encoder.layers.0.attention"]["v_head_dims"]
    start = sum(widths[:widths.index(5)])
    torch.testing.assert_close(pruned.encoder.layers[0].attention.v_proj.weight[start:start + 5], expected)
