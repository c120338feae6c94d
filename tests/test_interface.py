"""The prunable-model interface (spg.compress.interface) as both model families implement it:
unit counts and slices match the configs, and rebuilding with kept units computes exactly what
zeroing the other units computes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import padded_noise, perturbed

from spg.compress.interface import AttentionUnits, FeedForwardUnits, keep_head_dims, keep_units
from spg.training import sparsity_report
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC
from spg.whisper.model import Whisper, WhisperConfig

LENGTHS = torch.tensor([4000, 2900])
VOCAB, EOT, SOT, NO_TIMESTAMPS = 120, 100, 101, 106


def tiny_wav2vec2(seed: int = 0) -> Wav2Vec2CTC:
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                         conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                         do_stable_layer_norm=True, conv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, final_dropout=0.0, layerdrop=0.0)
    return perturbed(Wav2Vec2CTC(config)).eval()


def tiny_whisper(seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                           decoder_ffn_dim=40, max_source_positions=50, max_target_positions=32, eos_token_id=EOT,
                           pad_token_id=EOT, bos_token_id=SOT, decoder_start_token_id=SOT,
                           no_timestamps_token_id=NO_TIMESTAMPS)
    model = Whisper(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


@torch.no_grad()
def logits(model) -> torch.Tensor:
    if isinstance(model, Whisper):
        mel = torch.randn(2, 80, 40, generator=torch.Generator().manual_seed(1))
        ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
        return model(mel, ids)
    return model(padded_noise(LENGTHS), LENGTHS)[0]


@torch.no_grad()
def zero_units(units, indices) -> None:
    """Zero what the given heads / neurons write to the module output (W_out / fc2 columns)."""
    if isinstance(units, FeedForwardUnits):
        units.fc2.weight[:, list(indices)] = 0.0
        return
    for h in indices:
        units.out_proj.weight[:, units.v_slices()[h]] = 0.0


def test_units_match_the_configs() -> None:
    w2v = tiny_wav2vec2()
    units = w2v.structured_units()
    assert [u.name for u in units[:2]] == ["encoder.layers.0.attention", "encoder.layers.0.feed_forward"]
    assert [(u.kind, u.group, u.layer) for u in units] == \
        [(kind, group, layer) for layer in range(3)
         for kind, group in (("encoder.self_attn", "heads"), ("encoder.ffn", "ffn_units"))]
    attention, ffn = units[0], units[1]
    assert isinstance(attention, AttentionUnits) and isinstance(ffn, FeedForwardUnits)
    assert attention.num_heads == 4 and attention.qk_head_dims == attention.v_head_dims == (8,) * 4
    assert attention.qk_slices()[2] == slice(16, 24) and attention.head_dim == 8 and attention.head_dims_prunable
    assert attention.q_proj is w2v.encoder.layers[0].attention.q_proj and ffn.num_units == 48
    assert ffn.fc1 is w2v.encoder.layers[0].feed_forward.intermediate_dense
    linears = [linear for u in units for linear in u.linears()]
    assert linears == [linear for _, linear in w2v.prunable_linears()]

    whisper = tiny_whisper()
    units = whisper.structured_units()
    assert [(u.kind, u.layer) for u in units] == [
        ("encoder.self_attn", 0), ("encoder.ffn", 0), ("encoder.self_attn", 1), ("encoder.ffn", 1),
        ("decoder.self_attn", 0), ("decoder.cross_attn", 0), ("decoder.ffn", 0),
        ("decoder.self_attn", 1), ("decoder.cross_attn", 1), ("decoder.ffn", 1)]
    assert units[5].name == "decoder.layers.0.encoder_attn" and units[5].group == "decoder_cross_heads"
    assert units[5].q_proj is whisper.decoder.layers[0].encoder_attn.q_proj
    assert units[5].num_heads == 4 and units[5].v_slices()[3] == slice(24, 32) and not units[5].head_dims_prunable
    assert units[1].num_units == 48 and units[6].num_units == 40 and units[6].fc2 is whisper.decoder.layers[0].fc2
    assert [linear for u in units for linear in u.linears()] == [linear for _, linear in whisper.prunable_linears()]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_keeping_units_equals_zeroing_the_others(family: str) -> None:
    model = tiny_wav2vec2() if family == "wav2vec2" else tiny_whisper()
    keep, masked = {}, copy.deepcopy(model)
    masked_units = {u.name: u for u in masked.structured_units()}
    for i, units in enumerate(model.structured_units()):
        size = units.num_heads if isinstance(units, AttentionUnits) else units.num_units
        kept = [] if i == 2 else [j for j in range(size) if (j + i) % 3 != 0]      # one module loses everything
        keep[units.name] = kept
        zero_units(masked_units[units.name], [j for j in range(size) if j not in kept])
    small = keep_units(model, keep)
    torch.testing.assert_close(logits(small), logits(masked), rtol=0, atol=1e-5)
    assert [u.num_heads if isinstance(u, AttentionUnits) else u.num_units for u in small.structured_units()] == \
        [len(kept) for kept in keep.values()]
    assert small.num_parameters() < model.num_parameters()
    with pytest.raises(ValueError, match="no module"):
        keep_units(model, {"encoder.layers.9.attention": [0]})


def test_keeping_head_dims_equals_zeroing_the_others() -> None:
    model = tiny_wav2vec2()
    attention = model.structured_units()[2]                  # block 1
    qk = [[0, 3, 5], [1], [], list(range(8))]
    v = [[2, 7], [], [0, 1, 4], [6]]
    small = keep_head_dims(model, {attention.name: (qk, v)})
    masked = copy.deepcopy(model)
    target = masked.structured_units()[2]
    with torch.no_grad():
        for h, (qk_slice, v_slice) in enumerate(zip(target.qk_slices(), target.v_slices())):
            dropped_qk = [qk_slice.start + j for j in range(8) if j not in qk[h]]
            dropped_v = [v_slice.start + j for j in range(8) if j not in v[h]]
            target.q_proj.weight[dropped_qk] = 0.0
            target.q_proj.bias[dropped_qk] = 0.0
            target.out_proj.weight[:, dropped_v] = 0.0
    torch.testing.assert_close(logits(small), logits(masked), rtol=0, atol=1e-5)
    assert small.structured_units()[2].qk_head_dims == (3, 0, 8) and small.structured_units()[2].v_head_dims == (2, 3, 1)
    with pytest.raises(ValueError, match="whole heads only|keep their width"):
        whisper = tiny_whisper()
        keep_head_dims(whisper, {"encoder.layers.0.self_attn": ([[0]] * 4, [[0]] * 4)})


def test_sparsity_report_groups_by_the_units_layer() -> None:
    whisper = tiny_whisper()
    with torch.no_grad():
        whisper.encoder.layers[0].fc1.weight.zero_()         # encoder layer 0 only, not decoder layer 0
    report = sparsity_report(whisper)
    assert list(report["per_block_sparsity"]) == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    fc1 = whisper.encoder.layers[0].fc1.weight.numel()
    encoder_0 = sum(linear.weight.numel() for u in whisper.structured_units()[:2] for linear in u.linears())
    assert report["per_block_sparsity"]["encoder.0"] == fc1 / encoder_0
    assert report["per_block_sparsity"]["decoder.0"] == 0.0
    w2v = tiny_wav2vec2()
    assert list(sparsity_report(w2v)["per_block_sparsity"]) == [0, 1, 2]
