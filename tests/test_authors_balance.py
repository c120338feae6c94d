"""The pieces of the SPG authors' loss balance (issue 15): CTC summed over the batch, the
two-sided band controller, no gradient clipping; and the global-magnitude baseline (GMP)."""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import train as train_script
from test_cli import noise_corpus
from test_training import tiny_corpus, tiny_model
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from spg.compress.magnitude import GMP, global_magnitude_masks
from spg.compress.self_pinching import SPG, SparsityController, authors_band
from spg.data import Batch, make_targets
from spg.experiment import FAMILIES
from spg.run_settings import RunSettings, resolve_settings
from spg.ctc_training import CTCObjective, ctc_loss
from spg.training import TrainConfig, train
from spg.wav2vec2.io import model_config_from_hf, our_key
from spg.wav2vec2.model import Wav2Vec2CTC
from spg.whisper.model import Whisper


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ctc_reduction_equals_transformers(reduction):
    """transformers' Wav2Vec2ForCTC(labels=...).loss with ctc_loss_reduction = mean / sum."""
    torch.manual_seed(0)
    hf_config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                               conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                               feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                               ctc_loss_reduction=reduction, ctc_zero_infinity=True, layerdrop=0.0,
                               architectures=["Wav2Vec2ForCTC"])
    reference = Wav2Vec2ForCTC(hf_config).eval()
    ours = Wav2Vec2CTC(model_config_from_hf(reference.config.to_dict(), "config"))
    ours.load_state_dict({our_key(k, "wav2vec2."): v for k, v in reference.state_dict().items()})
    ours.eval()
    transcripts = ["HELLO WORLD", "A CAT"]
    waveforms = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 8000])
    targets, target_lengths = make_targets(transcripts)
    labels = torch.full((2, int(target_lengths.max())), -100)
    start = 0
    for row, length in enumerate(target_lengths.tolist()):
        labels[row, :length] = targets[start:start + length]
        start += length
    with torch.no_grad():
        expected = reference(waveforms, labels=labels).loss
        logits, frames = ours(waveforms, lengths)
    batch = Batch(ids=["a", "b"], waveforms=waveforms, lengths=lengths, targets=targets,
                  target_lengths=target_lengths, transcripts=transcripts)
    assert torch.allclose(ctc_loss(logits, frames, batch, reduction), expected, rtol=1e-5)
    if reduction == "sum":          # the sum is the per-utterance losses added: about B × L × mean
        mean = ctc_loss(logits, frames, batch, "mean")
        assert float(ctc_loss(logits, frames, batch, "sum")) > 5 * float(mean)


def test_band_controller_prunes_below_unprunes_above_and_rests_inside():
    """The authors' minmax rule with s* = 0.6 and band 0.02: + below 0.58, − above 0.6, 0 between."""
    controller = SparsityController(target=0.6, eta=2e-5, band=0.02)
    seen = []
    for step, sparsity in enumerate([0.1, 0.57, 0.585, 0.6, 0.61, 0.605, 0.59, 0.5]):
        controller.update(sparsity, step)
        seen.append(controller.current_eta())
    assert seen == [2e-5, 2e-5, 0.0, 0.0, -2e-5, -2e-5, 0.0, 2e-5]
    assert controller.first_reached == 2 and controller.switches == 4
    assert authors_band(0.5) == 0.02 and authors_band(0.6) == 0.002
    on_off = SparsityController(target=0.6, eta=1.0)
    for step, sparsity in enumerate([0.1, 0.61]):
        on_off.update(sparsity, step)
    assert on_off.current_eta() == 0.0                  # the bare controller never un-prunes


def test_negative_eta_above_the_band_lowers_the_thresholds(tmp_path):
    """Above the target the penalty's sign flips: kept weights are rewarded, thresholds come down."""
    model = tiny_model()
    method = SPG(0.3, eta=1e-2, normalised_eta=False, band=0.01, threshold_init=0.05, calibrate=False,
                 reset_on_switch=False)
    method.attach(model)
    method.controller.update(0.9, 0)                    # pretend the sparsity overshot far
    assert method.controller.current_eta() == -1e-2
    penalty = method.extra_loss(model, 0, 10)
    penalty.backward()
    assert all(m.gate.threshold.grad > 0 for m in method.matrices)   # d(−η·kept)/dt > 0: descent lowers t


def test_no_gradient_clipping_with_grad_clip_0(tmp_path):
    utterances = tiny_corpus(tmp_path)
    results = {}
    for clip in (0.0, 1e12, 1e-3):
        model = tiny_model()
        train(model, utterances, TrainConfig(steps=2, batch_size=3, lr=1e-3, grad_clip=clip, save_every=0),
              objective=CTCObjective(), progress=False)
        results[clip] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(results[0.0], results[1e12])     # 0 means no clipping at all
    assert not torch.equal(results[0.0], results[1e-3])


def test_global_magnitude_masks_by_hand():
    weights = {"a": torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "b": torch.tensor([[0.5, -5.0, 0.25]])}
    masks = global_magnitude_masks(weights, 3 / 7)        # drop the 3 smallest |w| of 7: 0.25, 0.5, 1
    assert masks["a"].tolist() == [[False, True], [True, True]]
    assert masks["b"].tolist() == [[False, True, False]]


def test_gmp_prunes_one_global_threshold_and_keeps_the_mask(tmp_path):
    utterances = tiny_corpus(tmp_path)
    model = tiny_model()
    weights = {name: linear.weight.detach().clone() for name, linear in model.prunable_linears()}
    everything = np.concatenate([w.abs().flatten().numpy() for w in weights.values()])
    method = GMP(0.6)
    train(model, utterances, TrainConfig(steps=3, batch_size=3, lr=1e-3, save_every=0), objective=CTCObjective(),
          method=method, progress=False)
    zeros = sum(int((linear.weight == 0).sum()) for _, linear in model.prunable_linears())
    assert zeros == round(0.6 * everything.size)
    threshold = np.sort(everything)[round(0.6 * everything.size) - 1]
    for name, linear in model.prunable_linears():
        expected_pruned = weights[name].abs() <= threshold              # no ties in random weights
        assert torch.equal(linear.weight == 0, expected_pruned), name
    per_matrix = model.compression["per_matrix_sparsity"]
    assert max(per_matrix.values()) - min(per_matrix.values()) > 0.01   # not uniform: one global threshold


def test_train_py_runs_gmp_and_the_authors_balance(tmp_path):
    data = noise_corpus(tmp_path / "corpus")
    common = ["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "3", "--batch-size", "3",
              "--sparsity", "0.6"]
    assert train_script.main(common + ["--method", "gmp", "--out", str(tmp_path / "gmp.pt"),
                                       "--json", str(tmp_path / "gmp.json")]) == 0
    assert abs(json.loads((tmp_path / "gmp.json").read_text())["sparsity"] - 0.6) < 1e-6
    # the authors' balance is the default: nothing to pass
    assert train_script.main(common + ["--out", str(tmp_path / "spg.pt"), "--json", str(tmp_path / "spg.json")]) == 0
    summary = json.loads((tmp_path / "spg.json").read_text())
    assert abs(summary["sparsity"] - 0.6) < 1e-3          # calibrated onto the target
    saved = torch.load(tmp_path / "spg.pt.state", weights_only=True)
    assert saved["train_config"]["loss_reduction"] == "sum" and saved["train_config"]["grad_clip"] == 0.0
    assert saved["train_config"]["weight_decay"] == 0.0
    assert saved["settings"]["--eta-raw"] == pytest.approx(1e-4) and saved["settings"]["--band"] == 0.002
    assert saved["settings"]["--controller"] == "band" and saved["settings"]["--reset"] is False
    compression = summary["compression"]
    assert compression["eta_form"] == "raw" and compression["band"] == 0.002 and compression["threshold_lr"] == 1e-2


def test_defaults_by_family_and_method():
    """Unset options resolve to the authors' settings for SPG and its baselines on wav2vec2/HuBERT,
    to the mean-loss settings for l0 and Whisper; explicit values are kept."""
    def resolved(argv, family):
        return resolve_settings(train_script.parse_args(argv), ctc=FAMILIES[family].ctc)
    for method in ("spg", "ump", "gmp", "mixed"):
        args = resolved(["--sparsity", "0.7", "--method", method], Wav2Vec2CTC)
        assert (args.ctc_reduction, args.weight_decay, args.grad_clip) == ("sum", 0.0, 0.0)
    args = resolved(["--sparsity", "0.7"], Wav2Vec2CTC)
    assert args.eta_raw == pytest.approx(1.5e-4) and args.eta is None                      # 3e-5 x 5 from 65 %
    assert (args.controller, args.band, args.reset) == ("band", 0.002, False)
    assert args.threshold_lr == 1.5 / 500                                     # THRESHOLD_TRAVEL / steps
    args = resolved(["--sparsity", "0.5", "--steps", "27000"], Wav2Vec2CTC)
    assert args.eta_raw == pytest.approx(1e-4) and args.band == 0.02 and args.threshold_lr == 2e-4   # the paper's lr
    args = resolved(["--sparsity", "0.7", "--controller", "on-off", "--weight-decay", "0.1"], Wav2Vec2CTC)
    assert args.reset is True and args.band is None and args.weight_decay == 0.1
    args = resolved(["--sparsity", "0.7", "--method", "l0"], Wav2Vec2CTC)
    assert (args.ctc_reduction, args.weight_decay, args.grad_clip) == ("mean", 0.01, 5.0)
    args = resolved(["--sparsity", "0.3", "--model", "whisper-tiny.en"], Whisper)
    assert (args.eta, args.eta_raw, args.controller, args.reset, args.threshold_lr) == (None, None, "on-off", True, None)
    assert (args.weight_decay, args.grad_clip) == (0.01, 5.0)


def test_settings_are_every_option_resolved_once():
    """RunSettings has a field for every train.py option (and the corpus folder), is frozen, and
    resolving leaves the parsed options as they were."""
    parser_fields = {action.dest for action in train_script.build_parser()._actions if action.dest != "help"}
    assert {field.name for field in dataclasses.fields(RunSettings)} == parser_fields | {"corpus"}
    options = train_script.parse_args(["--sparsity", "0.7", "--data", "/corpus"])
    before = vars(options).copy()
    settings = resolve_settings(options, ctc=True)
    assert vars(options) == before and options.eta_raw is None and settings.eta_raw == pytest.approx(1.5e-4)
    assert settings.corpus == Path("/corpus")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sparsity = 0.5
    with pytest.raises(TypeError, match="not settings \\['surprise'\\]"):
        resolve_settings(argparse.Namespace(**before, surprise=1), ctc=True)
    with pytest.raises(SystemExit, match="--band must be below --sparsity 0.7, got 0.8"):
        resolve_settings(train_script.parse_args(["--sparsity", "0.7", "--band", "0.8"]), ctc=True)


class PlantedModel(torch.nn.Module):
    """Two equally large prunable matrices. `useful` has SMALL weights and carries the whole
    task; `planted` has weights 50x larger but its output is multiplied by 0, so the task
    ignores it. Global magnitude pruning at 50 % removes `useful` entirely; a method that
    learns where to prune must remove `planted` instead."""

    def __init__(self, width: int = 32):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.useful = torch.nn.Linear(width, width, bias=False)
        self.planted = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.useful.weight.copy_(0.02 * torch.randn(width, width, generator=generator))
            self.planted.weight.copy_(1.0 * torch.randn(width, width, generator=generator))

    def prunable_linears(self):
        return [("useful", self.useful), ("planted", self.planted)]

    def forward(self, x):
        return self.useful(x) + 0.0 * self.planted(x)


def planted_run(method: SPG, reduction: str, steps: int = 300, lr: float = 1e-3) -> dict:
    """Train PlantedModel under `method` on reproducing the useful map; its per-matrix sparsities."""
    torch.manual_seed(0)
    model = PlantedModel()
    teacher = model.useful.weight.detach().clone()             # the task: reproduce the useful map
    method.attach(model)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, TrainConfig(lr=lr, weight_decay=0.0)), lr=lr)
    for step in range(1, steps + 1):
        method.before_step(model, step, steps)
        x = torch.randn(64, 32)
        errors = (model(x) - x @ teacher.T).square()
        loss = errors.sum() if reduction == "sum" else errors.mean()
        penalty = method.extra_loss(model, step, steps)
        loss = loss if penalty is None else loss + penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(model, step, steps, optimizer=optimizer)
    method.finish(model)
    assert abs(model.compression["sparsity"] - 0.5) < 1e-3
    return model.compression["per_matrix_sparsity"]


def test_spg_learns_to_prune_the_matrix_the_task_ignores():
    """Issue 15, 3a: with the authors' balance (loss summed over the batch, raw eta, band
    controller) SPG prunes the ignored, large matrix far more than global magnitude pruning
    would and keeps the useful, small one. With a mean-reduced loss and the normalised eta'
    (SPG's settings before issue 15) the penalty owns the thresholds and SPG prunes like
    global magnitude: the wrong matrix."""
    model = PlantedModel()
    reference = global_magnitude_masks({n: l.weight for n, l in model.prunable_linears()}, 0.5)
    gmp = {name: 1 - keep.float().mean().item() for name, keep in reference.items()}
    assert gmp["useful"] > 0.95 and gmp["planted"] < 0.05     # magnitude would prune the wrong one

    authors = planted_run(SPG(0.5, eta=1e-3, normalised_eta=False, band=authors_band(0.5), reset_on_switch=False,
                              threshold_lr=1e-2), "sum")
    assert authors["planted"] > 0.9 and authors["useful"] < 0.1, authors      # measured: 0.971 / 0.029
    before = planted_run(SPG(0.5, eta=1.7e3, normalised_eta=True, band=None, threshold_lr=1e-2), "mean")
    assert before["useful"] > 0.8 and before["planted"] < 0.2, before          # measured: 0.917 / 0.083
