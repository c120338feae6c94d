"""Tests for spg.compress.hardconcrete (L0 hard-concrete gates, arXiv 2306.01385) and spg.compress.l0 (its
training-loop plug-in): gate statistics, the closed-form parameter count against a physically
pruned model, exactness of the fold + surgery, the Lagrangian, and the training plumbing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import padded_noise, perturbed, write_corpus

import spg
from spg.compress import hardconcrete as hc
from spg.compress.hardconcrete import InitDropRates
from spg.compress import l0
from spg.compress.l0 import L0Method, default_distill_layers
from spg.ctc_training import CTCObjective
from spg.data import read_corpus
from spg.training import TrainConfig, learning_rate_factor, train
from spg.wav2vec2.model import ModelConfig, Wav2Vec2CTC

LENGTHS = torch.tensor([4000, 2900])
WORDS = ["A B", "CAT", "THE DOG", "HI", "NO YES", "IT IS"]


def tiny_model(pre_layer_norm: bool = True, seed: int = 0, hidden: int = 32, blocks: int = 3,
               dropout: float = 0.0) -> Wav2Vec2CTC:
    """`blocks` blocks, 4 heads of hidden/4, FFN 3/2·hidden; every parameter perturbed (no zero bias)."""
    torch.manual_seed(seed)
    layout = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True) if pre_layer_norm else {}
    config = ModelConfig(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=4,
                         intermediate_size=3 * hidden // 2, conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3),
                         conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         hidden_dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
                         final_dropout=dropout, layerdrop=dropout, **layout)
    return perturbed(Wav2Vec2CTC(config))


def waveforms() -> torch.Tensor:
    return padded_noise(LENGTHS)


@torch.no_grad()
def logits(model: Wav2Vec2CTC) -> torch.Tensor:
    return model(waveforms(), LENGTHS)[0]


def prunable_count(model: Wav2Vec2CTC) -> int:
    """All parameters (weights and biases) of the six prunable Linear layers of every block."""
    return sum(p.numel() for _, linear in model.prunable_linears() for p in linear.parameters())


@torch.no_grad()
def set_binary_gates(gates: hc.L0Gates, pattern: list[dict]) -> None:
    """Saturate every gate: +30 (kept, P(z≠0) = 1) or −30 (pruned), from 0/1 tensors per block."""
    for block, keep in zip(gates.blocks, pattern):
        for name in ("heads", "qk_dims", "v_dims", "ffn"):
            getattr(block, name).log_alpha.copy_(30.0 * (2.0 * keep[name].float() - 1.0))


def random_pattern(gates: hc.L0Gates, generator: torch.Generator) -> list[dict]:
    """Random 0/1 gates with the edge cases: block 0 fully pruned (no head, no FFN neuron);
    in block 1 head 0 is gated off, head 1 keeps q/k dims but no value dim (removed
    altogether), head 2 keeps value dims but no q/k dim (kept: uniform attention)."""
    pattern = []
    for block in gates.blocks:
        pattern.append({name: (torch.rand(getattr(block, name).num_units, generator=generator) < 0.6)
                        for name in ("heads", "qk_dims", "v_dims", "ffn")})
    pattern[0] = {name: torch.zeros_like(value) for name, value in pattern[0].items()}
    width = gates.blocks[1].qk_head_dims[0]
    p = pattern[1]
    p["heads"][:] = torch.tensor([False, True, True, True])
    p["qk_dims"][width:2 * width] = True
    p["v_dims"][width:2 * width] = False
    p["qk_dims"][2 * width:3 * width] = False
    p["v_dims"][2 * width:3 * width] = True
    return pattern


# --- the gate distribution ---------------------------------------------------------------

def test_sampling_statistics_match_the_closed_forms() -> None:
    values = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0])
    samples = 40_000
    gate = hc.HardConcrete([len(values)] * samples, 0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(values.repeat(samples))
    torch.manual_seed(0)
    z = gate.sample().detach().view(samples, len(values))
    # P(z = 0) = 1 − sigmoid(a − β log(−l/r)); P(z = 1) = sigmoid(a + β log(−l/r)).
    p_zero = 1.0 - torch.sigmoid(values - hc.L0_SHIFT)
    p_one = torch.sigmoid(values + hc.L0_SHIFT)
    # E[z] by quadrature over u (midpoint rule, 200k points).
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u))[:, None] / hc.BETA + values.double() / hc.BETA)
    mean = (s * (hc.LIMIT_R - hc.LIMIT_L) + hc.LIMIT_L).clamp(0, 1).mean(0)
    tolerance = 4 * 0.5 / math.sqrt(samples)                  # 4 standard errors of a proportion
    torch.testing.assert_close((z == 0).double().mean(0), p_zero.double(), atol=tolerance, rtol=0)
    torch.testing.assert_close((z == 1).double().mean(0), p_one.double(), atol=tolerance, rtol=0)
    torch.testing.assert_close(z.double().mean(0), mean, atol=tolerance, rtol=0)
    # Expected L0 = Σ P(z ≠ 0), against the Monte Carlo count of non-zero gates.
    small = hc.HardConcrete([5], 0.5)
    with torch.no_grad():
        small.log_alpha.copy_(values)
    expected = small.expected_l0().item()
    assert abs((z != 0).double().sum(1).mean().item() - expected) < 4 * 1.2 / math.sqrt(samples)
    assert abs(expected - (1 - p_zero).sum().item()) < 1e-6


def test_initial_drop_rate() -> None:
    gate = hc.HardConcrete([1000], 0.01, generator=torch.Generator().manual_seed(0))
    assert abs(gate.log_alpha.mean().item() - math.log(99.0)) < 0.01
    assert gate.log_alpha.std().item() < 0.02


def test_deterministic_mask_keeps_the_expected_count_per_group() -> None:
    torch.manual_seed(0)
    gate = hc.HardConcrete([6, 6, 6, 9], 0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(gate.num_units) * 3)
    gate.eval()
    mask = gate()
    p = gate.keep_probability().detach()
    start = 0
    for size in (6, 6, 6, 9):
        part, log_alpha = mask[start:start + size], gate.log_alpha[start:start + size].detach()
        assert int((part != 0).sum()) == round(p[start:start + size].sum().item())
        kept = part != 0
        if kept.any() and (~kept).any():               # the kept units are those with the largest log_alpha
            assert log_alpha[kept].min() > log_alpha[~kept].max()
        torch.testing.assert_close(part[kept], torch.sigmoid(0.8 * log_alpha[kept] / hc.BETA))
        start += size
    assert torch.equal(gate(ste=True), (mask != 0).float())          # STE: binary, same units


def test_ste_forward_is_binary_with_the_relaxed_gradient() -> None:
    gate = hc.HardConcrete([64], 0.3).train()
    torch.manual_seed(3)
    z_ste = gate(ste=True)
    z_ste.sum().backward()
    gradient = gate.log_alpha.grad.clone()
    assert set(z_ste.detach().unique().tolist()) <= {0.0, 1.0}
    gate.log_alpha.grad = None
    torch.manual_seed(3)
    z = gate()                                    # same u: the relaxed sample
    z.sum().backward()
    assert torch.equal(z_ste.detach(), (z.detach() > 0).float())
    assert torch.equal(gradient, gate.log_alpha.grad)


# --- parameter counts --------------------------------------------------------------------

@pytest.mark.parametrize("ste", [False, True])
def test_closed_form_count_equals_the_pruned_model(ste: bool) -> None:
    model = tiny_model()
    full = prunable_count(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        gates = hc.L0Gates.for_model(model, ste=ste)
        assert gates.full_num_parameters() == full
        set_binary_gates(gates, random_pattern(gates, generator))
        pruned = l0.finalize(model, gates)
        assert pruned.config.layer_num_heads[0] == 0 and pruned.config.layer_intermediate_sizes[0] == 0
        counted = prunable_count(pruned)
        assert gates.deployed_num_parameters() == counted
        assert abs(gates.expected_num_parameters().item() - counted) < 1e-2 * counted   # float32 sum
        assert round(gates.expected_num_parameters().item()) == counted
        assert pruned.num_parameters() == model.num_parameters() - full + counted


def test_expected_count_is_the_mean_pruned_count_of_sampled_gates() -> None:
    """E[count] in closed form (with the head / value-dim interplay) against Monte Carlo
    over sampled gates, each counted exactly as surgery would build it (z ≠ 0 = kept)."""
    model = tiny_model(blocks=1)
    gates = hc.L0Gates.for_model(model)
    block = gates.blocks[0]
    with torch.no_grad():
        for name in ("heads", "qk_dims", "v_dims", "ffn"):
            getattr(block, name).log_alpha.normal_(-1.0, 1.5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    counts = [block.num_parameters_of(block.heads.sample(), block.qk_dims.sample(), block.v_dims.sample(),
                                      block.ffn.sample()) for _ in range(1500)]
    counts = torch.tensor(counts, dtype=torch.float64)
    expected = block.expected_num_parameters().item()
    assert abs(counts.mean().item() - expected) < 4 * counts.std().item() / math.sqrt(len(counts))


# --- exactness of fold + surgery ---------------------------------------------------------------

@pytest.mark.parametrize("pre_layer_norm", [True, False])
def test_pruned_model_equals_the_masked_model(pre_layer_norm: bool) -> None:
    model = tiny_model(pre_layer_norm)
    gates = hc.L0Gates.for_model(model)
    with torch.no_grad():                          # soft deterministic values, many units pruned
        for parameter in gates.parameters():
            parameter.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(parameter.numel()))
    hooks = hc.apply_gates(model, gates)
    masked = logits(model)
    pruned = l0.finalize(model, gates)
    assert prunable_count(pruned) == gates.deployed_num_parameters() < gates.full_num_parameters()
    assert pruned.config.layer_qk_head_dims is not None          # per-head widths differ
    torch.testing.assert_close(logits(pruned), masked, atol=1e-5, rtol=0)
    # Folding in place (dense shapes, pruned units exactly zero) computes the same.
    hooks.remove()                                  # (before copying: a deep copy would share them)
    folded = copy.deepcopy(model)
    l0.fold_masks_(folded, gates.deterministic_masks())
    torch.testing.assert_close(logits(folded), masked, atol=1e-5, rtol=0)
    zeros = sum(int((linear.weight == 0).sum()) + int((linear.bias == 0).sum())
                for _, linear in folded.prunable_linears())
    assert zeros == gates.full_num_parameters() - gates.deployed_num_parameters()
    # The hooks come off again: the original model is unchanged.
    assert not torch.allclose(logits(model), masked)


def test_fully_pruned_head_and_block_stay_valid(tmp_path) -> None:
    model = tiny_model()
    gates = hc.L0Gates.for_model(model)
    set_binary_gates(gates, random_pattern(gates, torch.Generator().manual_seed(5)))
    hooks = hc.apply_gates(model, gates)
    masked = logits(model)
    hooks.remove()
    pruned = l0.finalize(model, gates)
    assert pruned.config.layer_num_heads[0] == 0 and pruned.config.layer_intermediate_sizes[0] == 0
    assert pruned.config.layer_num_heads[1] == 2                # heads 0 and 1 of block 1 are gone,
    assert pruned.config.layer_qk_head_dims[1][0] == 0          # head 2 survives with no q/k dims
    torch.testing.assert_close(logits(pruned), masked, atol=1e-5, rtol=0)
    spg.save(pruned, tmp_path / "l0.pt")
    loaded = spg.load(tmp_path / "l0.pt")
    assert loaded.config.to_dict() == pruned.config.to_dict()
    torch.testing.assert_close(logits(loaded), logits(pruned), atol=0, rtol=0)


# --- the Lagrangian ------------------------------------------------------------------------

def test_lagrangian_descends_on_the_gates_and_ascends_on_lambda() -> None:
    model = tiny_model(blocks=1)
    gates = hc.L0Gates.for_model(model)
    lambda1, lambda2 = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    sparsity = gates.expected_sparsity()
    target = 0.6
    gap = sparsity.item() - target
    loss = hc.lagrangian(sparsity, target, lambda1, lambda2)
    loss.backward()
    assert abs(loss.item() - (0.5 * gap + 2.0 * gap ** 2)) < 1e-6
    # Gradient reversal: a descent step on λ is an ascent step on the Lagrangian.
    assert abs(lambda1.grad.item() + gap) < 1e-6 and abs(lambda2.grad.item() + gap ** 2) < 1e-6
    # The gates see ∂L/∂ŝ = λ1 + 2 λ2 (ŝ − t) < 0 here, so descent raises the sparsity,
    # i.e. lowers log_alpha: the gradient on log_alpha is positive.
    assert all(bool((p.grad > 0).all()) for p in gates.parameters())


def test_target_ramp() -> None:
    assert hc.target_at(0, 100, 0.7, 0.5) == 0.0
    assert abs(hc.target_at(25, 100, 0.7, 0.5) - 0.35) < 1e-12
    assert hc.target_at(50, 100, 0.7, 0.5) == 0.7 == hc.target_at(99, 100, 0.7, 0.5)
    assert hc.target_at(0, 100, 0.7, 0.0) == 0.7


def test_controller_reaches_the_target() -> None:
    """A synthetic task loss (distance of the gated model's logits to the dense model's)
    against the Lagrangian, with the loop's optimiser, schedule and our default rates.
    In 300 steps the Lagrangian alone lands within ±10 % of the target (0.673 here; see
    spg/l0.py on why it misses); the final calibration puts the deployed model at or just
    above the target (a common shift can flip a whole head, 6 % of this small model's
    parameters; 0.2 % in wav2vec2-base)."""
    model = tiny_model(hidden=64, blocks=2).train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(0)
    features = torch.randn(4, 50, 16)
    with torch.no_grad():
        reference = model(None, features=features)[0]
    method = L0Method(0.6)
    gates = hc.L0Gates.for_model(model)
    hc.apply_gates(model, gates)
    lambdas = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.AdamW([
        {"params": list(gates.parameters()), "lr": method.gate_lr, "weight_decay": 0.0},
        {"params": [lambdas], "lr": method.lambda_lr, "weight_decay": 0.0}])
    steps = 300
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * learning_rate_factor(step, steps, 0.1)
        target = hc.target_at(step, steps, 0.6, method.target_warmup_fraction)
        task = (model(None, features=features)[0] - reference).pow(2).mean()
        loss = task + hc.lagrangian(gates.expected_sparsity(), target, lambdas[0], lambdas[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(gates.expected_sparsity().item() - 0.6) < 0.1
    assert abs(gates.deployed_sparsity() - 0.6) < 0.1
    gates.calibrate(0.6)
    assert 0.6 <= gates.deployed_sparsity() < 0.65


def test_calibrate_lands_on_the_target() -> None:
    gates = hc.L0Gates.for_model(tiny_model())
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.normal_(1.0, 2.0, generator=torch.Generator().manual_seed(2))
    before = gates.deployed_sparsity()
    shift = gates.calibrate(0.7)
    after = gates.deployed_sparsity()
    assert before < 0.7 <= after < 0.76 and shift < 0     # one head is ~5 % of this small model
    with torch.no_grad():                                  # the smallest reachable sparsity >= 0.7:
        for parameter in gates.parameters():               # a slightly smaller shift falls below it
            parameter.add_(1e-3)
    assert gates.deployed_sparsity() < 0.7


# --- the training-loop plug-in -----------------------------------------------------------------

def tiny_corpus(tmp_path):
    write_corpus(tmp_path, "train", {f"{i:04d}": (WORDS[i % len(WORDS)], 0.2 + 0.03 * i) for i in range(6)})
    return read_corpus(tmp_path, "train")


def test_l0_method_resumes_exactly_and_finishes(tmp_path) -> None:
    utterances = tiny_corpus(tmp_path)
    config = TrainConfig(steps=6, batch_size=3, lr=1e-3, save_every=2)
    straight_model, straight = tiny_model(dropout=0.1).train(), L0Method(0.5, history_every=1)
    train(straight_model, utterances, config, objective=CTCObjective(),
          method=straight, checkpoint_path=tmp_path / "a.state", progress=False)

    first_model = tiny_model(dropout=0.1).train()
    train(first_model, utterances, config, objective=CTCObjective(), method=L0Method(0.5, history_every=1),
          checkpoint_path=tmp_path / "b.state", progress=False, stop_after_steps=4)
    resumed_model, resumed = tiny_model(seed=9, dropout=0.1).train(), L0Method(0.5, history_every=1, seed=9)
    train(resumed_model, utterances, config, objective=CTCObjective(),
          method=resumed, checkpoint_path=tmp_path / "b.state", resume=True,
          progress=False)
    for key, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    for a, b in zip(straight.gates.parameters(), resumed.gates.parameters()):
        assert torch.equal(a, b)
    assert straight.lambda1.item() == resumed.lambda1.item() != 0.0
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    assert resumed.history == straight.history

    # finish(): calibrated to the target, hooks off, folded model == physically pruned model.
    pruned = straight.pruned_model
    record = pruned.compression
    assert record["method"] == "l0" and record["sparsity"] >= 0.5 > record["sparsity_before_calibration"]
    assert prunable_count(pruned) == record["prunable_params_kept"] == straight.gates.deployed_num_parameters()
    assert abs(record["sparsity"] - 0.5) < 0.02
    straight_model.eval()
    torch.testing.assert_close(logits(pruned), logits(straight_model), atol=1e-5, rtol=0)
    assert straight_model.compression == record
    assert not straight_model._forward_pre_hooks
    assert not straight_model.encoder.layers[0].attention.q_proj._forward_hooks


def test_l0_method_with_distillation(tmp_path) -> None:
    utterances = tiny_corpus(tmp_path)
    model = tiny_model().train()
    teacher = copy.deepcopy(model)
    method = L0Method(0.3, distill_teacher=teacher, history_every=1, calibrate=False)
    train(model, utterances, TrainConfig(steps=3, batch_size=3, lr=1e-3), objective=CTCObjective(),
          method=method, progress=False)
    assert method.distill_layers == default_distill_layers(3) == [1, 2, 3]
    assert all(math.isfinite(h["distill"]) and h["distill"] > 0 for h in method.history)
    assert default_distill_layers(12) == [4, 8, 12] and default_distill_layers(6) == [2, 4, 6]
    assert not teacher.encoder.layers[0]._forward_hooks and method.pruned_model is not None


def test_l0_per_gate_type_learning_rates_and_drop_rates(tmp_path) -> None:
    """Issue 16, item 2: one optimiser group per gate type with its own lr (every gate in
    exactly one group), the initial drop rates per type, and the target still reached."""
    from spg.compress.l0 import GATE_LR, gate_parameters_by_type
    utterances = tiny_corpus(tmp_path)
    model = tiny_model(dropout=0.1).train()
    method = L0Method(0.5, gate_lr={"heads": 0.02, "ffn": 0.05}, init=InitDropRates(heads=0.001, ffn=0.2))
    method.attach(model)
    groups = method.gate_groups()
    by_type = gate_parameters_by_type(method.gates)
    assert [g["lr"] for g in groups] == [0.02, GATE_LR, GATE_LR, 0.05][:len(groups)]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in method.gates.parameters())
    # log_alpha starts near log((1 - p) / p) for each type (N(., 0.01) noise)
    assert abs(float(by_type["heads"][0].detach().mean()) - math.log(0.999 / 0.001)) < 0.05
    assert abs(float(by_type["ffn"][0].detach().mean()) - math.log(0.8 / 0.2)) < 0.05
    method.detach(model)
    with pytest.raises(ValueError, match="unknown gate types"):
        L0Method(0.5, gate_lr={"layers": 0.1})

    model = tiny_model(dropout=0.1).train()
    method = L0Method(0.5, gate_lr={"heads": 0.02}, init=InitDropRates(ffn=0.2))
    train(model, utterances, TrainConfig(steps=6, batch_size=3, lr=1e-3, save_every=0), objective=CTCObjective(),
          method=method, progress=False)
    record = method.pruned_model.compression
    assert 0.5 <= record["sparsity"] < 0.56       # the smallest reachable; one head is ~5 % of this model
    assert record["gate_lr"]["heads"] == 0.02 and record["gate_lr"]["ffn"] == GATE_LR


# --- the variants of issue 16: dims-only and a minimum number of heads -------------------------

def test_dims_only_has_no_head_gate_and_a_head_goes_with_its_value_dims() -> None:
    """Without head gates a head is removed exactly when all its value dims are (its q/k dims
    go with it): counted by hand and against the physically pruned model."""
    model = tiny_model(blocks=1)
    gates = hc.L0Gates.for_model(model, head_gates=False)
    block = gates.blocks[0]
    assert block.heads is None and "heads" not in l0.gate_parameters_by_type(gates)
    d, width = block.hidden_size, block.qk_head_dims[0]
    with torch.no_grad():
        for name in ("qk_dims", "v_dims", "ffn"):
            getattr(block, name).log_alpha.fill_(30.0)
        block.v_dims.log_alpha[:width] = -30.0              # head 0: no value dim left
        block.qk_dims.log_alpha[width:width + 3] = -30.0     # head 1: 3 q/k dims fewer
    removed = width * 2 * (d + 1) + width * (2 * d + 1) + 3 * 2 * (d + 1)
    assert gates.deployed_num_parameters() == gates.full_num_parameters() - removed
    assert round(gates.expected_num_parameters().item()) == gates.full_num_parameters() - removed
    hooks = hc.apply_gates(model, gates)
    masked = logits(model.eval())
    hooks.remove()
    pruned = l0.finalize(model, gates)
    assert pruned.config.layer_num_heads == [3] and prunable_count(pruned) == gates.deployed_num_parameters()
    torch.testing.assert_close(logits(pruned), masked, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="min_heads needs head gates"):
        L0Method(0.5, head_gates=False, min_heads=1)


def test_min_heads_keeps_the_heads_with_the_largest_log_alpha() -> None:
    """min_heads=2 with every head gate shut: the two heads with the largest log_alpha stay,
    in the deterministic masks, in training samples and in the expected count (P = 1)."""
    model = tiny_model(blocks=1)
    gates = hc.L0Gates.for_model(model, min_heads=2)
    block = gates.blocks[0]
    with torch.no_grad():
        for name in ("qk_dims", "v_dims", "ffn"):
            getattr(block, name).log_alpha.fill_(30.0)
        block.heads.log_alpha.copy_(torch.tensor([-30.0, -20.0, -40.0, -25.0]))   # heads 1 and 3 largest
    width = block.v_head_dims[0]
    head_params = width * 2 * (d := block.hidden_size) + 2 * width + width * (2 * d + 1)
    full = gates.full_num_parameters()
    assert gates.deployed_num_parameters() == full - 2 * head_params
    assert abs(gates.expected_num_parameters().item() - (full - 2 * head_params)) < 1
    value = block.deterministic_masks(binary=True).value.view(4, width)
    assert value.amax(dim=1).tolist() == [0.0, 1.0, 0.0, 1.0]
    block.train()
    sample = block.masks().value.view(4, width)
    assert torch.equal(sample[[1, 3]], torch.ones(2, width)) and sample[[0, 2]].abs().max() == 0
    pruned = l0.finalize(model, gates)
    assert pruned.config.layer_num_heads == [2] and prunable_count(pruned) == gates.deployed_num_parameters()
    # a module with fewer heads than min_heads keeps them all
    assert hc.L0Gates.for_model(model, min_heads=9).blocks[0].min_heads == 4


@pytest.mark.parametrize("options", [{"head_gates": False}, {"min_heads": 1}])
def test_l0_variants_reach_the_target(tmp_path, options) -> None:
    utterances = tiny_corpus(tmp_path)
    model = tiny_model(dropout=0.1).train()
    method = L0Method(0.5, **options)
    train(model, utterances, TrainConfig(steps=6, batch_size=3, lr=1e-3, save_every=0), objective=CTCObjective(),
          method=method, progress=False)
    pruned, record = method.pruned_model, method.pruned_model.compression
    assert 0.5 <= record["sparsity"] < 0.56 and record["calibration_shift"] != 0.0
    assert record["head_gates"] == options.get("head_gates", True)
    if "min_heads" in options:
        assert min(pruned.config.layer_num_heads) >= 1
