"""Tests for spg.wav2vec2.surgery: a physically smaller model must compute exactly what the full model
computes with the removed units masked to zero."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import padded_noise, perturbed

import spg
from spg.wav2vec2 import surgery
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC

HEAD_DIM = 8          # hidden 32 / 4 heads
LENGTHS = torch.tensor([4000, 2900])


def tiny_model(pre_layer_norm: bool = True, seed: int = 0) -> Wav2Vec2CTC:
    """3 blocks, hidden 32, 4 heads of 8, FFN 24; every parameter perturbed so that no bias is 0."""
    torch.manual_seed(seed)
    layout = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True) if pre_layer_norm else {}
    config = ModelConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=24,
                         conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **layout)
    return perturbed(Wav2Vec2CTC(config))


def waveforms() -> torch.Tensor:
    return padded_noise(LENGTHS)


@torch.no_grad()
def logits(model: Wav2Vec2CTC, lengths=LENGTHS) -> torch.Tensor:
    return model(waveforms(), lengths)[0]


# --- masking in the full model (the reference) ---------------------------------------

@torch.no_grad()
def mask_qk_dims(model: Wav2Vec2CTC, block: int, head: int, dims: list[int]) -> None:
    """Zero query/key dims: rows of W_q, W_k and their biases (they then add 0 to q.k)."""
    attention = model.encoder.layers[block].attention
    start = sum(attention.qk_head_dims[:head])
    for proj in (attention.q_proj, attention.k_proj):
        for j in dims:
            proj.weight[start + j] = 0.0
            proj.bias[start + j] = 0.0


@torch.no_grad()
def mask_v_dims(model: Wav2Vec2CTC, block: int, head: int, dims: list[int]) -> None:
    """Zero value dims: rows of W_v and its bias, and the same columns of W_out."""
    attention = model.encoder.layers[block].attention
    start = sum(attention.v_head_dims[:head])
    for j in dims:
        attention.v_proj.weight[start + j] = 0.0
        attention.v_proj.bias[start + j] = 0.0
        attention.out_proj.weight[:, start + j] = 0.0


def mask_head(model: Wav2Vec2CTC, block: int, head: int) -> None:
    # Zeroing q/k alone would leave a uniform-attention head; its value path must go too.
    mask_qk_dims(model, block, head, list(range(HEAD_DIM)))
    mask_v_dims(model, block, head, list(range(HEAD_DIM)))


@torch.no_grad()
def mask_ffn_unit(model: Wav2Vec2CTC, block: int, unit: int) -> None:
    """Zero fc1 row + bias (gelu(0) = 0) and the fc2 column."""
    ffn = model.encoder.layers[block].feed_forward
    ffn.intermediate_dense.weight[unit] = 0.0
    ffn.intermediate_dense.bias[unit] = 0.0
    ffn.output_dense.weight[:, unit] = 0.0


# --- tests ---------------------------------------------------------------------------

KEPT_HEADS = {0: [1, 3], 1: [], 2: [0, 1, 2, 3]}          # block 1: zero heads
KEPT_FFN = {0: [0, 5, 6, 20, 23], 1: [2], 2: []}           # block 2: zero FFN units


@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_removing_heads_and_neurons_equals_masking(pre_layer_norm: bool) -> None:
    model = tiny_model(pre_layer_norm)
    before = copy.deepcopy(model.state_dict())
    pruned = surgery.keep_units(model, heads=KEPT_HEADS, ffn_units=KEPT_FFN)

    masked = copy.deepcopy(model)
    for block, kept in KEPT_HEADS.items():
        for head in set(range(4)) - set(kept):
            mask_head(masked, block, head)
    for block, kept in KEPT_FFN.items():
        for unit in set(range(24)) - set(kept):
            mask_ffn_unit(masked, block, unit)

    # Unpadded for the post-LN layout (group-norm feature extractor is padding-sensitive).
    lengths = LENGTHS if pre_layer_norm else None
    torch.testing.assert_close(logits(pruned, lengths), logits(masked, lengths), atol=1e-5, rtol=0)
    assert (logits(model, lengths) - logits(masked, lengths)).abs().max() > 1e-2   # the masks matter
    assert pruned.config.layer_num_heads == [2, 0, 4]
    assert pruned.config.layer_intermediate_sizes == [5, 1, 0]
    assert pruned.config.layer_qk_head_dims is None              # whole heads: the simple config
    removed = (2 + 4) * (4 * HEAD_DIM * 32 + 3 * HEAD_DIM) + (19 + 23 + 24) * (2 * 32 + 1)
    assert pruned.num_parameters() == model.num_parameters() - removed
    # The input model is untouched; the new one keeps its mode.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert model.config.layer_num_heads is None and not pruned.training


def test_keep_heads_and_keep_ffn_units_are_the_parts_of_keep_units() -> None:
    model = tiny_model()
    both = surgery.keep_units(model, heads=KEPT_HEADS, ffn_units=KEPT_FFN)
    chained = surgery.keep_ffn_units(surgery.keep_heads(model, KEPT_HEADS), KEPT_FFN)
    torch.testing.assert_close(logits(both), logits(chained), atol=0, rtol=0)


def test_zero_heads_and_zero_units_leave_only_the_biases() -> None:
    model = tiny_model()
    empty = surgery.keep_units(model, heads={b: [] for b in range(3)}, ffn_units={b: [] for b in range(3)})
    layer = empty.encoder.layers[0]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer.attention(x), layer.attention.out_proj.bias.expand(2, 5, 32))
    torch.testing.assert_close(layer.feed_forward(x), layer.feed_forward.output_dense.bias.expand(2, 5, 32))
    assert torch.isfinite(logits(empty)).all()


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny_model()
    pruned = surgery.keep_units(model, heads=KEPT_HEADS, ffn_units=KEPT_FFN)
    pruned.compression = {"method": "test"}
    spg.save(pruned, tmp_path / "pruned.pt")
    loaded = spg.load(tmp_path / "pruned.pt")
    assert loaded.config == pruned.config and loaded.compression == {"method": "test"}
    torch.testing.assert_close(logits(loaded), logits(pruned), atol=0, rtol=0)


# Fine-grained: per head, kept query/key dims and kept value dims (within the head).
QK_DIMS = [[0, 2, 5], [], list(range(8)), [7]]
V_DIMS = [list(range(1, 8)), [0, 3], [], [4, 5]]   # head 1: no q/k dims (uniform attention); head 2: removed


def test_per_head_widths_equal_masking(tmp_path) -> None:
    model = tiny_model()
    pruned = surgery.keep_head_dims(model, {0: (QK_DIMS, V_DIMS), 2: ([[1, 2]] * 4, [[0]] * 4)})
    masked = copy.deepcopy(model)
    for head in range(4):
        mask_qk_dims(masked, 0, head, sorted(set(range(8)) - set(QK_DIMS[head])))
        mask_v_dims(masked, 0, head, sorted(set(range(8)) - set(V_DIMS[head])))
        mask_qk_dims(masked, 2, head, [0, 3, 4, 5, 6, 7])
        mask_v_dims(masked, 2, head, list(range(1, 8)))
    torch.testing.assert_close(logits(pruned), logits(masked), atol=1e-5, rtol=0)
    assert (logits(model) - logits(masked)).abs().max() > 1e-2
    # Head 2 of block 0 had no value dims left and is gone.
    assert pruned.config.layer_qk_head_dims == [[3, 0, 1], [8] * 4, [2] * 4]
    assert pruned.config.layer_v_head_dims == [[7, 2, 2], [8] * 4, [1] * 4]
    assert pruned.config.layer_num_heads == [3, 4, 4]
    spg.save(pruned, tmp_path / "fine.pt")
    torch.testing.assert_close(logits(spg.load(tmp_path / "fine.pt")), logits(pruned), atol=0, rtol=0)


def test_rebuild_installs_given_weights() -> None:
    """rebuild takes arbitrary new unit weights (what clustering produces); here two heads of
    block 1 are replaced by one head that is their sum on the output side."""
    model = tiny_model()
    weights = surgery.block_weights(model, 1)
    two = weights.attention.keep_heads([0, 1])
    rows = slice(0, HEAD_DIM)
    merged = surgery.AttentionWeights(
        q_weight=two.q_weight[rows], q_bias=two.q_bias[rows], k_weight=two.k_weight[rows], k_bias=two.k_bias[rows],
        v_weight=two.v_weight[rows], v_bias=two.v_bias[rows],
        out_weight=two.out_weight[:, :HEAD_DIM] + two.out_weight[:, HEAD_DIM:], out_bias=two.out_bias,
        qk_head_dims=[HEAD_DIM], v_head_dims=[HEAD_DIM])
    new = surgery.rebuild(model, {1: surgery.BlockWeights(attention=merged)})
    assert new.config.layer_num_heads == [4, 1, 4]
    assert torch.equal(new.encoder.layers[1].attention.out_proj.weight, merged.out_weight)
    assert torch.equal(new.encoder.layers[1].feed_forward.output_dense.weight,
                       model.encoder.layers[1].feed_forward.output_dense.weight)


def test_bad_arguments_raise() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="out of range"):
        surgery.keep_heads(model, {0: [4]})
    with pytest.raises(ValueError, match="duplicate"):
        surgery.keep_ffn_units(model, {0: [1, 1]})
    with pytest.raises(ValueError, match="block 3 does not exist"):
        surgery.keep_heads(model, {3: [0]})
    weights = surgery.block_weights(model, 0)
    weights.feed_forward.fc2_weight = weights.feed_forward.fc2_weight[:, :3]
    with pytest.raises(ValueError, match="fc2_weight has shape"):
        surgery.rebuild(model, {0: weights})
