"""Magnitude baselines (UMP, mixed) and the sparse on-disk format of pruned models."""

import os

import pytest
import torch
from test_training import tiny_corpus, tiny_model

import spg
from spg.compress.magnitude import Mixed, UMP, magnitude_mask
from spg.ctc_training import CTCObjective
from spg.loading import load, save
from spg.training import TrainConfig, sparsity_report, train

WAVEFORMS, LENGTHS = torch.randn(2, 4000, generator=torch.Generator().manual_seed(5)), torch.tensor([4000, 2900])


def logits_of(model):
    with torch.no_grad():
        return model.eval()(WAVEFORMS, LENGTHS)[0]


def test_magnitude_mask_drops_exactly_the_smallest():
    weight = torch.tensor([[0.5, -0.1, 0.3], [0.0, -0.7, 0.2]])
    assert magnitude_mask(weight, 0.5).tolist() == [[True, False, True], [False, True, False]]
    assert magnitude_mask(weight, 0.0).all() and not magnitude_mask(weight, 1.0).any()
    ties = torch.ones(4, 4)
    assert int((~magnitude_mask(ties, 0.25)).sum()) == 4      # ties broken by position, count exact


def exact_counts(model, wanted: dict):
    for name, linear in model.prunable_linears():
        zeros = int((linear.weight == 0).sum())
        assert zeros == round(wanted[name] * linear.weight.numel()), name


def test_ump_run_hits_exactly_the_given_sparsity(tmp_path):
    utterances = tiny_corpus(tmp_path)
    model = tiny_model()
    train(model, utterances, TrainConfig(steps=6, batch_size=3, lr=1e-3), objective=CTCObjective(),
          method=UMP(0.7), progress=False)
    names = [name for name, _ in model.prunable_linears()]
    exact_counts(model, {name: 0.7 for name in names})
    assert abs(sparsity_report(model)["sparsity"] - 0.7) < 1e-3
    assert model.compression["method"] == "ump"
    assert all(param.grad is None or torch.isfinite(param.grad).all() for param in model.parameters())


def test_mixed_run_hits_exactly_the_given_per_matrix_sparsities(tmp_path):
    utterances = tiny_corpus(tmp_path)
    names = [name for name, _ in tiny_model().prunable_linears()]
    per_matrix = {name: 0.3 + 0.05 * i for i, name in enumerate(names)}      # as an SPG run would store
    model = tiny_model()
    train(model, utterances, TrainConfig(steps=6, batch_size=3, lr=1e-3), objective=CTCObjective(),
          method=Mixed(per_matrix), progress=False)
    exact_counts(model, per_matrix)
    report = sparsity_report(model)
    assert all(abs(report["per_matrix_sparsity"][n] - s) < 1e-3 for n, s in per_matrix.items())
    with pytest.raises(ValueError, match="do not match"):
        Mixed({"encoder.layers.0.attention.q_proj": 0.5}).attach(tiny_model())


def test_fixed_mask_resume_is_bit_identical(tmp_path):
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=6, batch_size=3, lr=1e-3, save_every=2)
    straight = tiny_model()
    train(straight, utterances, config, objective=CTCObjective(),
          method=UMP(0.5), checkpoint_path=tmp_path / "a.state", progress=False)
    part = tiny_model()
    train(part, utterances, config, objective=CTCObjective(),
          method=UMP(0.5), checkpoint_path=tmp_path / "b.state", progress=False,
          stop_after_steps=3)
    resumed = tiny_model(seed=7)       # other weights, hence other magnitude masks: the state must win
    train(resumed, utterances, config, objective=CTCObjective(),
          method=UMP(0.5), checkpoint_path=tmp_path / "b.state", resume=True,
          progress=False)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def pruned_model(sparsity: float):
    model = tiny_model()
    with torch.no_grad():
        for _, linear in model.prunable_linears():
            linear.weight.mul_(magnitude_mask(linear.weight, sparsity))
    model.compression = {"method": "test", "sparsity": sparsity}
    return model


@pytest.mark.parametrize("half", [False, True])
def test_sparse_save_load_identical_logits_and_promised_size(tmp_path, half):
    sparsity = 0.6
    model = pruned_model(sparsity)
    save(model, tmp_path / "sparse.pt", half=half)
    loaded = load(tmp_path / "sparse.pt")
    assert torch.equal(logits_of(loaded), logits_of(model.half().float() if half else model))
    assert loaded.compression == model.compression
    checkpoint = torch.load(tmp_path / "sparse.pt", weights_only=True)
    assert checkpoint["version"] == 2
    prunable = {f"{name}.weight" for name, _ in model.prunable_linears()}
    assert set(checkpoint["sparse"]) == prunable

    # Prunable-weight storage: at most (1 − s) + 1/32 of dense fp32, (1 − s) + 1/16 of dense fp16.
    bytes_per = 2 if half else 4
    dense_bytes = sum(model.state_dict()[k].numel() for k in prunable) * bytes_per
    sparse_bytes = sum(e["mask"].numel() + e["values"].numel() * e["values"].element_size()
                       for e in checkpoint["sparse"].values())
    achieved = sparsity_report(model)["sparsity"]          # 0.6 up to rounding per matrix
    assert abs(achieved - sparsity) < 1e-3
    # (+1 byte per matrix: the last mask byte is padded)
    assert sparse_bytes <= ((1 - achieved) + 1 / (8 * bytes_per)) * dense_bytes + len(prunable)

    # The whole file shrinks by the same bytes (up to torch.save's per-tensor bookkeeping).
    dense_model = tiny_model()
    save(dense_model, tmp_path / "dense.pt", half=half)
    assert torch.load(tmp_path / "dense.pt", weights_only=True)["version"] == 1   # dense: old format
    saved = os.path.getsize(tmp_path / "dense.pt") - os.path.getsize(tmp_path / "sparse.pt")
    assert saved >= dense_bytes - sparse_bytes - 1500 * len(prunable)


def test_pruned_model_exports_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = pruned_model(0.5)
    spg.export_hf(model, tmp_path / "hf")
    hf_model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        mask = (torch.arange(WAVEFORMS.shape[1])[None, :] < LENGTHS[:, None]).long()
        hf_logits = hf_model(WAVEFORMS, attention_mask=mask).logits
    ours = logits_of(model)
    frames = model.frame_lengths(LENGTHS)
    for row, count in enumerate(frames.tolist()):
        assert torch.allclose(ours[row, :count], hf_logits[row, :count], atol=1e-4)
    hf_weight = hf_model.wav2vec2.encoder.layers[0].attention.q_proj.weight
    assert abs(float((hf_weight == 0).float().mean()) - 0.5) < 1e-3
