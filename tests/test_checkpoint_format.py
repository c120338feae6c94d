"""Our one checkpoint format (spg.checkpoint): what `spg.save` writes for both model families,
sparse storage of pruned matrices with the size it promises, and reading every older file
("spg" versions 1 and 2, "spg-whisper" version 1), written here by hand."""

import math
import os
import re

import numpy as np
import pytest
import torch

import spg
from spg.checkpoint import CheckpointError
from spg.loading import load_whisper
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC
from spg.whisper.model import Whisper, WhisperConfig
from spg.whisper.tokenizer import WhisperTokenizer

EOT, SOT, NO_TIMESTAMPS = 50, 51, 52


def tiny_whisper(seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=60, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=96,
                           max_source_positions=20, max_target_positions=10, eos_token_id=EOT, pad_token_id=EOT,
                           bos_token_id=SOT, decoder_start_token_id=SOT, no_timestamps_token_id=NO_TIMESTAMPS,
                           begin_suppress_tokens=[])
    model = Whisper(config).eval()
    with torch.no_grad():                      # LayerNorms and biases away from 1 and 0
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.tokenizer = WhisperTokenizer({chr(ord("a") + i): i for i in range(26)},
                                       [{"id": EOT, "content": "<|endoftext|>", "special": True}],
                                       {("a", "b"): 0})
    return model


def tiny_wav2vec2(seed: int = 0) -> Wav2Vec2CTC:
    torch.manual_seed(seed)
    model = Wav2Vec2CTC(ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, conv_dim=(16,) * 3, conv_kernel=(10, 3, 3),
                                    conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                                    num_conv_pos_embedding_groups=4)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def prune_half(model) -> set[str]:
    """Zero the smaller half (by magnitude) of every prunable matrix; their state-dict names."""
    with torch.no_grad():
        for _, linear in model.prunable_linears():
            flat = linear.weight.view(-1)
            flat[flat.abs().argsort()[: flat.numel() // 2]] = 0.0
    model.compression = {"method": "test", "sparsity": 0.5}
    return {f"{name}.weight" for name, _ in model.prunable_linears()}


@torch.no_grad()
def outputs(model) -> torch.Tensor:
    if isinstance(model, Whisper):
        mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(1))
        return model(mel, torch.tensor([[SOT, 3, 4, 5]]))
    return model(torch.randn(2, 3200, generator=torch.Generator().manual_seed(1)), torch.tensor([3200, 2300]))[0]


def emptied(value):
    """`value` with every tensor replaced by an empty one of its dtype."""
    if isinstance(value, torch.Tensor):
        return value.new_empty(0)
    if isinstance(value, dict):
        return {key: emptied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [emptied(item) for item in value]
    return value


def assert_same_state(loaded, expected: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# ----------------------------------------------------------------------------------------
# What spg.save writes
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["whisper", "wav2vec2"])
@pytest.mark.parametrize("half", [False, True])
def test_pruned_model_is_stored_sparse_and_round_trips_exactly(tmp_path, family, half):
    model = tiny_whisper() if family == "whisper" else tiny_wav2vec2()
    prunable = prune_half(model)
    path = tmp_path / "pruned.pt"
    spg.save(model, path, half=half)

    loaded = spg.load(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert loaded.compression == model.compression
    cast = {name: t.half().float() if half and t.is_floating_point() else t for name, t in model.state_dict().items()}
    assert_same_state(loaded, cast)                 # bit-exact (fp32) or exact after the fp16 cast
    if not half:
        assert torch.equal(outputs(loaded), outputs(model))
    if family == "whisper":
        assert loaded.tokenizer.to_dict() == model.tokenizer.to_dict()
    else:
        assert loaded.vocab == model.vocab

    checkpoint = torch.load(path, weights_only=True)                # nothing executable in it
    assert (checkpoint["format"], checkpoint["family"]) == ("spg", family)
    assert checkpoint["version"] == (3 if family == "whisper" else 2)
    assert set(checkpoint["sparse"]) == prunable

    # The promised size: each prunable matrix of n entries at sparsity 1/2 takes n/8 mask bytes
    # (rounded up) + n/2 values, at most ((1 − 1/2) + 1/(8·b)) of its dense n·b bytes; the rest
    # is stored dense. The file adds torch.save's bookkeeping, measured as the size of the same
    # checkpoint with every tensor emptied, plus the zip padding that aligns each tensor's
    # bytes to 64 (with the 4-byte field that holds it).
    b = 2 if half else 4
    state = model.state_dict()
    dense_prunable = sum(state[name].numel() for name in prunable) * b
    rest = sum(t.numel() * (b if t.is_floating_point() else t.element_size())
               for name, t in state.items() if name not in prunable)
    expected = rest + sum(math.ceil(state[name].numel() / 8) + state[name].numel() // 2 * b for name in prunable)
    assert expected <= (0.5 + 1 / (8 * b)) * dense_prunable + rest + len(prunable)
    torch.save(emptied(checkpoint), tmp_path / "empty.pt")
    records = len(checkpoint["state_dict"]) + 2 * len(checkpoint["sparse"])
    bookkeeping = os.path.getsize(tmp_path / "empty.pt") + 80 * records
    os.remove(tmp_path / "empty.pt")
    assert os.path.getsize(path) <= expected + bookkeeping
    assert os.path.getsize(path) < (0.5 + 1 / (8 * b)) * dense_prunable + rest + len(prunable) + bookkeeping

    # ... and a dense file of the same model is larger by about what sparse storage saves.
    spg.save(type(model)(model.config) if family == "whisper" else Wav2Vec2CTC(model.config, model.vocab),
             tmp_path / "dense.pt", half=half)
    saved = os.path.getsize(tmp_path / "dense.pt") - os.path.getsize(path)
    assert saved >= dense_prunable - (expected - rest) - 800 * len(prunable)   # a mask + values record each
    assert sorted(os.listdir(tmp_path)) == ["dense.pt", "pruned.pt"]          # no temporary files left


def test_versions_written(tmp_path):
    """The oldest version that holds the model, so older spg versions read what they can: a
    dense wav2vec2 is version 1, a pruned one 2 (both also readable before "family" existed),
    any Whisper 3 (a version-2 reader refuses it by its version, instead of misreading it)."""
    spg.save(tiny_wav2vec2(), tmp_path / "dense_w2v.pt")
    spg.save(tiny_whisper(), tmp_path / "dense_whisper.pt")
    w2v = torch.load(tmp_path / "dense_w2v.pt", weights_only=True)
    whisper = torch.load(tmp_path / "dense_whisper.pt", weights_only=True)
    assert (w2v["version"], w2v["family"], "sparse" in w2v) == (1, "wav2vec2", False)
    assert set(w2v) == {"format", "version", "family", "config", "vocab", "state_dict", "compression"}
    assert (whisper["version"], whisper["family"], "sparse" in whisper) == (3, "whisper", False)
    assert set(whisper) == {"format", "version", "family", "config", "tokenizer", "state_dict", "compression"}
    assert isinstance(spg.load(tmp_path / "dense_whisper.pt"), Whisper)
    assert isinstance(load_whisper(tmp_path / "dense_whisper.pt"), Whisper)
    assert isinstance(spg.load(tmp_path / "dense_w2v.pt"), Wav2Vec2CTC)
    with pytest.raises(TypeError, match="Linear"):
        spg.save(torch.nn.Linear(2, 2), tmp_path / "linear.pt")


# ----------------------------------------------------------------------------------------
# Older files, written by hand
# ----------------------------------------------------------------------------------------

def packed_mask(tensor: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits((tensor != 0).flatten().numpy()))


def test_old_spg_v1_and_v2_files_load(tmp_path):
    model = tiny_wav2vec2()
    prune_half(model)
    state = model.state_dict()
    common = {"config": model.config.to_dict(), "vocab": list(model.vocab), "compression": model.compression}
    torch.save({"format": "spg", "version": 1, **common, "state_dict": state}, tmp_path / "v1.pt")
    name = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    sparse = {name: {"shape": list(state[name].shape), "mask": packed_mask(state[name]),
                     "values": state[name][state[name] != 0]}}
    dense = {key: value for key, value in state.items() if key != name}
    torch.save({"format": "spg", "version": 2, **common, "state_dict": dense, "sparse": sparse}, tmp_path / "v2.pt")
    for file in ["v1.pt", "v2.pt"]:
        loaded = spg.load(tmp_path / file)
        assert isinstance(loaded, Wav2Vec2CTC) and loaded.compression == model.compression
        assert_same_state(loaded, state)


def test_old_spg_whisper_v1_file_loads(tmp_path):
    model = tiny_whisper()
    old = {"format": "spg-whisper", "version": 1, "config": model.config.to_dict(), "state_dict": model.state_dict(),
           "compression": {"method": "cluster"}, "tokenizer": model.tokenizer.to_dict()}
    torch.save(old, tmp_path / "old.pt")
    for loaded in [spg.load(tmp_path / "old.pt"), load_whisper(tmp_path / "old.pt")]:
        assert isinstance(loaded, Whisper) and loaded.compression == {"method": "cluster"}
        assert loaded.tokenizer.to_dict() == model.tokenizer.to_dict()
        assert_same_state(loaded, model.state_dict())


# ----------------------------------------------------------------------------------------
# Refusals: each names the file
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    ({"version": 4}, "format 'spg' version 4 is not supported (this spg reads versions 1..3"),
    ({"version": 0}, "format 'spg' version 0 is not supported"),
    ({"version": "3"}, "format 'spg' version '3' is not supported"),
    ({"version": True}, "format 'spg' version True is not supported"),
    ({"format": "spg-whisper", "version": 2}, "format 'spg-whisper' version 2 is not supported "
                                              "(this spg reads versions 1..1"),
    ({"family": "conformer"}, "'family' is 'conformer'; this spg knows 'wav2vec2', 'whisper'"),
    ({"family": None}, "'family' is None"),
    ({"version": 2}, "a whisper model needs format version 3, the file says 2"),
    ({"config": None}, "'config' is missing or not a dict"),
    ({"compression": [1]}, "'compression' is not a dict"),
])
def test_refusals(tmp_path, edit, match):
    spg.save(tiny_whisper(), tmp_path / "good.pt")
    checkpoint = torch.load(tmp_path / "good.pt", weights_only=True)
    checkpoint.update(edit)
    checkpoint = {key: value for key, value in checkpoint.items() if not (key == "family" and value is None)}
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'bad.pt'}: ") + ".*" + re.escape(match)):
        spg.load(tmp_path / "bad.pt")


def test_family_mismatch_and_vocab_for_whisper(tmp_path):
    spg.save(tiny_wav2vec2(), tmp_path / "w2v.pt")
    with pytest.raises(CheckpointError, match=r"w2v.pt: holds a wav2vec2 model, not whisper \(expected format "
                                              r"'spg' with family 'whisper' or format 'spg-whisper'\)"):
        load_whisper(tmp_path / "w2v.pt")
    spg.save(tiny_whisper(), tmp_path / "whisper.pt")
    with pytest.raises(CheckpointError, match="whisper.pt: a Whisper model has its own tokenizer"):
        spg.load(tmp_path / "whisper.pt", vocab=["a"])
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not an spg checkpoint"):
        load_whisper(tmp_path / "other.pt")


def test_payload_bytes_counts_values_and_mask_bits():
    """Hand count: a 4x4 matrix with 6 non-zeros is stored sparse (16 mask bits = 2 bytes, plus
    6 values), a 4-vector dense; fp16 halves the values, not the mask."""
    from spg.checkpoint import payload_bytes
    weight = torch.zeros(4, 4)
    weight.view(-1)[[0, 3, 5, 8, 12, 15]] = torch.arange(1.0, 7.0)
    state = {"weight": weight, "bias": torch.ones(4)}
    assert payload_bytes(state, half=True) == 2 + 6 * 2 + 4 * 2
    assert payload_bytes(state, half=False) == 2 + 6 * 4 + 4 * 4
    dense = {"weight": torch.ones(4, 4)}                # no zeros: stored dense
    assert payload_bytes(dense, half=True) == 16 * 2
