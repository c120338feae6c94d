"""Tests for spg.whisper.training: Whisper fine-tuning with the shared loop (teacher-forced
decoder cross-entropy) under dense training, UMP and SPG. Reference for the loss:
transformers' WhisperForConditionalGeneration computing its own loss from `labels`."""

import json
import sys
from pathlib import Path

import pytest
import torch

import spg
from helpers import write_corpus
from spg.compress.magnitude import UMP
from spg.compress.self_pinching import SPG
from spg.data import AudioCache, read_corpus
from spg.training import TrainConfig, sparsity_report, train
from spg.whisper.audio import log_mel_spectrogram
from spg.whisper.io import save_whisper
from spg.whisper.model import Whisper
from spg.whisper.tokenizer import WhisperTokenizer
from spg.whisper.training import IGNORE_INDEX, WhisperObjective, target_text, teacher_forcing_tokens
from test_whisper import EOT, NO_TIMESTAMPS, SOT, perturbed_whisper, tiny_hf_model, write_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
VOCAB = 300      # covers the tiny tokenizer's 256 byte tokens and its merged pieces


def test_target_text_uses_whisper_orthography():
    assert target_text("MANY TAILORS SANG THROUGH YOUR STATION") == " Many tailors sang through your station."
    assert target_text("I THINK I'M LATE BUT ISN'T IT FINE") == " I think I'm late but isn't it fine."
    assert target_text("  WHERE IS IT? ") == " Where is it?"
    assert target_text("") == ""


def test_teacher_forcing_tokens_shift_mask_and_pad():
    inputs, labels = teacher_forcing_tokens([[5, 6, 7], [8]], prompt=[1, 2], eos=0, max_length=10)
    # sequences: [1 2 5 6 7 0] and [1 2 8 0]
    assert inputs.tolist() == [[1, 2, 5, 6, 7], [1, 2, 8, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6, 7, 0], [IGNORE_INDEX, 8, 0, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="max_target_positions=3"):
        teacher_forcing_tokens([[5, 6, 7]], prompt=[1, 2], eos=0, max_length=3)


def tiny_corpus(root: Path, count: int = 6) -> list:
    texts = ["HELLO THE WORLD", "A CAT", "THE CAFE IS OPEN", "I SING"]
    write_corpus(root, "train", {f"{i:04d}": (texts[i % len(texts)], 0.4 + 0.1 * i) for i in range(count)})
    return read_corpus(root, "train")


def test_objective_loss_matches_transformers(tmp_path):
    utterances = tiny_corpus(tmp_path / "corpus", 3)
    hf = tiny_hf_model(vocab_size=VOCAB, max_source_positions=1500)
    hf.save_pretrained(tmp_path / "hf")
    model = spg.load(tmp_path / "hf")
    write_tiny_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = WhisperTokenizer.from_file(tmp_path / "tokenizer.json")
    objective = WhisperObjective(tokenizer)
    objective.freeze(model, TrainConfig())
    audio = AudioCache(utterances)
    ours = objective.loss(model, audio, [0, 1, 2], torch.device("cpu"))

    texts = [tokenizer.encode(target_text(u.transcript)) for u in utterances]
    assert tokenizer.decode(texts[0]) == " Hello the world."
    prompt = model.config.prompt_ids()     # [SOT]: this HF folder has no generation_config.json
    inputs, labels = teacher_forcing_tokens(texts, prompt, EOT)
    assert inputs[:, :len(prompt)].tolist() == [prompt] * 3
    assert int((labels != IGNORE_INDEX).sum()) == sum(len(t) + 1 for t in texts)
    mel = torch.stack([log_mel_spectrogram(audio.waveform(i)) for i in range(3)])
    with torch.no_grad():
        reference = hf(input_features=mel, decoder_input_ids=inputs, labels=labels).loss
    torch.testing.assert_close(ours.detach(), reference, rtol=1e-5, atol=1e-5)


def tiny_whisper(tmp_path: Path, encoder_attention_heads: int = 1) -> Whisper:
    # every input is a 30 s window (1500 encoder positions): one encoder head keeps the tests fast
    model = perturbed_whisper(seed=3, vocab_size=VOCAB, max_source_positions=1500,
                              encoder_attention_heads=encoder_attention_heads)
    write_tiny_tokenizer(tmp_path / "tokenizer.json")
    model.tokenizer = WhisperTokenizer.from_file(tmp_path / "tokenizer.json")
    return model


def mean_loss(model: Whisper, utterances) -> float:
    objective = WhisperObjective(model.tokenizer)
    with torch.no_grad():
        return objective.loss(model.eval(), AudioCache(utterances), list(range(len(utterances))),
                              torch.device("cpu")).item()


def test_dense_finetuning_lowers_the_decoder_loss_and_keeps_the_front_end(tmp_path):
    utterances = tiny_corpus(tmp_path / "corpus", 4)
    model = tiny_whisper(tmp_path)
    conv_before = model.encoder.conv1.weight.detach().clone()
    fc1_before = model.encoder.layers[0].fc1.weight.detach().clone()
    before = mean_loss(model, utterances)
    config = TrainConfig(steps=15, batch_size=4, lr=5e-3, warmup_fraction=0.1, save_every=0)
    result = train(model, utterances, config, objective=WhisperObjective(), progress=False)
    assert result.steps_done == 15 and result.skipped_steps == 0
    after = mean_loss(model, utterances)
    assert after < 0.5 * before, (before, after)
    assert torch.equal(model.encoder.conv1.weight, conv_before)          # frozen front end
    assert not torch.equal(model.encoder.layers[0].fc1.weight, fc1_before)


def test_ump_on_whisper_prunes_every_matrix_and_resumes_exactly(tmp_path):
    utterances = tiny_corpus(tmp_path / "corpus")
    config = TrainConfig(steps=4, batch_size=2, lr=1e-3, save_every=1)
    straight = tiny_whisper(tmp_path)
    train(straight, utterances, config, method=UMP(0.5), objective=WhisperObjective(), progress=False)
    report = sparsity_report(straight)
    assert len(report["per_matrix_sparsity"]) == len(straight.prunable_linears())
    assert all(abs(value - 0.5) < 1e-3 for value in report["per_matrix_sparsity"].values())

    resumed = tiny_whisper(tmp_path)
    state = tmp_path / "run.state"
    first = train(resumed, utterances, config, method=UMP(0.5), objective=WhisperObjective(),
                  checkpoint_path=state, progress=False, stop_after_steps=2)
    assert first.steps_done == 2
    resumed = tiny_whisper(tmp_path)
    train(resumed, utterances, config, method=UMP(0.5), objective=WhisperObjective(),
          checkpoint_path=state, resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_spg_on_whisper_reaches_the_target_and_leaves_plain_linears(tmp_path):
    utterances = tiny_corpus(tmp_path / "corpus")
    model = tiny_whisper(tmp_path)
    method = SPG(0.4, normalised_eta=True, band=None, threshold_lr=0.03)   # Whisper's settings in train.py
    config = TrainConfig(steps=25, batch_size=2, lr=1e-3, save_every=0)
    train(model, utterances, config, method=method, objective=WhisperObjective(), progress=False)
    report = sparsity_report(model)
    assert abs(report["sparsity"] - 0.4) < 0.005
    assert model.compression["method"] == "spg" and model.compression["first_reached_step"] is not None
    # per-matrix sparsities are learned, not uniform
    assert max(report["per_matrix_sparsity"].values()) - min(report["per_matrix_sparsity"].values()) > 0.05
    assert all(type(linear.weight) is torch.nn.Parameter for _, linear in model.prunable_linears())
    with torch.no_grad():
        logits = model(torch.zeros(1, 80, 3000), torch.tensor([[SOT, NO_TIMESTAMPS]]))
    assert torch.isfinite(logits).all()


def test_train_cli_fine_tunes_a_tiny_whisper_with_ump(tmp_path):
    sys.path.insert(0, str(REPO))
    import train as train_cli
    tiny_corpus(tmp_path / "corpus")
    write_corpus(tmp_path / "corpus", "dev", {"0000": ("A CAT", 0.5)})
    write_corpus(tmp_path / "corpus", "test", {f"{i:04d}": (["HELLO WORLD", "A CAT"][i % 2], 0.5) for i in range(3)})
    model = tiny_whisper(tmp_path)
    save_whisper(model, tmp_path / "w.pt")
    def run(method: str, out, summary_path) -> int:
        return train_cli.main(["--model", str(tmp_path / "w.pt"), "--method", method, "--sparsity", "0.5",
                               "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--data", str(tmp_path / "corpus"),
                               "--test-split", "test", "--eval-utterances", "2", "--out", str(out),
                               "--json", str(summary_path)])

    out, summary_path = tmp_path / "ump.pt", tmp_path / "summary.json"
    assert run("ump", out, summary_path) == 0
    summary = json.loads(summary_path.read_text())
    assert set(summary["compressed_wer"]) == set(summary["dense_wer"]) == {"librivox", "cards", "beckett", "test"}
    assert abs(summary["sparsity"] - 0.5) < 1e-3 and summary["steps"] == 2
    saved = spg.load(out)
    assert isinstance(saved, Whisper)
    assert abs(sparsity_report(saved)["sparsity"] - summary["sparsity"]) < 1e-9
    with pytest.raises(SystemExit, match="--dense-eval applies to wav2vec2/HuBERT models only"):
        train_cli.main(["--model", str(tmp_path / "w.pt"), "--method", "ump", "--sparsity", "0.5",
                        "--dense-eval", str(tmp_path / "dense.json"), "--data", str(tmp_path / "corpus")])
    with pytest.raises(SystemExit, match="--distill applies to wav2vec2/HuBERT models only"):
        train_cli.main(["--model", str(tmp_path / "w.pt"), "--method", "l0", "--sparsity", "0.5", "--distill",
                        "--data", str(tmp_path / "corpus")])
    # L0 runs on Whisper too (spg.compress.l0 sees the model through spg.compress.interface)
    out, summary_path = tmp_path / "l0.pt", tmp_path / "l0.json"
    assert run("l0", out, summary_path) == 0
    summary = json.loads(summary_path.read_text())
    assert set(summary["kept"]) == {"encoder_heads", "encoder_ffn_units", "decoder_heads", "decoder_cross_heads",
                                    "decoder_ffn_units"}
    assert summary["sparsity"] >= 0.5 and summary["params_total"] < summary["params_dense"]
    assert summary["forward_input"] == "one 30 s window"     # what the summary's forward time was measured on
    saved = spg.load(out)
    assert isinstance(saved, Whisper) and saved.num_parameters() == summary["params_total"]


# --- L0 over the prunable-model interface (heads of every attention module, FFN neurons) ----------

@torch.no_grad()
def whisper_logits(model: Whisper) -> torch.Tensor:
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = SOT
    return model(mel, ids)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_soft_l0_gates_fold_into_a_smaller_whisper(tmp_path):
    from spg.compress import hardconcrete as hc
    from spg.compress import l0
    model = tiny_whisper(tmp_path).eval()
    gates = hc.L0Gates.for_model(model)
    assert len(gates.blocks) == 2 + 2 * 2                       # encoder (attn, ffn); decoder (self), (cross, ffn)
    assert [b.qk_dims for b in gates.blocks] == [None] * 6 and not gates.blocks[2].has_ffn
    with torch.no_grad():                                       # soft values, some units dropped
        for parameter in gates.parameters():
            parameter.normal_(1.0, 3.0, generator=torch.Generator().manual_seed(4))
    hooks = hc.apply_gates(model, gates)
    gated = whisper_logits(model)
    hooks.remove()
    pruned = l0.finalize(model, gates)
    prunable = sum(p.numel() for _, linear in pruned.prunable_linears() for p in linear.parameters())
    assert prunable == gates.deployed_num_parameters() < gates.full_num_parameters()
    assert gates.full_num_parameters() == sum(p.numel() for _, linear in model.prunable_linears()
                                              for p in linear.parameters())
    torch.testing.assert_close(whisper_logits(pruned), gated, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_l0_training_prunes_a_whisper_to_its_target(tmp_path):
    from spg.compress.l0 import L0Method
    utterances = tiny_corpus(tmp_path / "corpus", 4)
    # 4 encoder heads: with one head of a quarter of the encoder's attention, a common shift of
    # the barely trained gates could not land near the target
    model = tiny_whisper(tmp_path, encoder_attention_heads=4).train()
    method = L0Method(0.5, history_every=1)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, save_every=0)
    result = train(model, utterances, config, method=method, objective=WhisperObjective(), progress=False)
    assert result.steps_done == 6 and result.skipped_steps == 0
    pruned = method.pruned_model
    record = pruned.compression
    assert record["method"] == "l0" and 0.5 <= record["sparsity"] < 0.51        # calibrated onto the target
    prunable = sum(p.numel() for _, linear in pruned.prunable_linears() for p in linear.parameters())
    assert prunable == record["prunable_params_kept"] == method.gates.deployed_num_parameters()
    assert pruned.num_parameters() < model.num_parameters()
    model.eval()                                                # the folded (gated) training model
    torch.testing.assert_close(whisper_logits(pruned), whisper_logits(model), atol=1e-5, rtol=0)
    assert not model._forward_pre_hooks and model.compression == record


def test_gated_whisper_decodes_with_the_eval_masks(tmp_path):
    """greedy_decode runs the encoder and decoder without model(...): the hooks use the
    deterministic masks, not the last training sample."""
    from spg.compress import hardconcrete as hc
    from spg.compress import l0
    model = tiny_whisper(tmp_path)
    gates = hc.L0Gates.for_model(model)
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(5))
    hooks = hc.apply_gates(model, gates)
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    model.train()(mel, torch.tensor([[SOT, NO_TIMESTAMPS]]))        # leaves a training sample behind
    gated = model.eval().greedy_decode(mel, max_new_tokens=4)
    hooks.remove()
    assert gated == l0.finalize(model, gates).greedy_decode(mel, max_new_tokens=4)
