"""Self-pinching gates (spg.compress.self_pinching): masks and gradients by hand, the straight-through
estimator, the controller, finalize, a short run to the target, and exact resumption."""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from test_training import tiny_corpus, tiny_model

from spg.compress.self_pinching import (SPG, SelfPinchingGate, SparsityController, attach_gates, calibrate_thresholds,
                                        cosine_temperature, finalize, gated_matrices, hard_sparsity, sparsity_penalty)
from spg.ctc_training import CTCObjective
from spg.training import TrainConfig, sparsity_report, train

# W, t = 0.3, τ = 0.1. Then (W² − t²)/τ =
#   [[-0.8,  1.6,  0.0 ],        so M = sigmoid(·) = [[0.310026, 0.832018, 0.500000],
#    [ 0.7, -0.5, -0.9 ],                             [0.668188, 0.377541, 0.289050],
#    [ 2.7,  0.325, -0.275]]                          [0.937027, 0.580542, 0.431680]]
# and B = [W² ≥ t²] = [[0,1,1],[1,0,0],[1,1,0]] (0.3 itself is kept: W² = t² counts as ≥).
W = [[0.1, -0.5, 0.3], [0.4, -0.2, 0.0], [0.6, 0.35, -0.25]]
SOFT = [[0.310026, 0.832018, 0.500000], [0.668188, 0.377541, 0.289050], [0.937027, 0.580542, 0.431680]]
HARD = [[0, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_soft_and_hard_masks_and_gradients_by_hand():
    gate = SelfPinchingGate(threshold_init=0.3, temperature=0.1)
    weight = torch.tensor(W, requires_grad=True)
    assert torch.allclose(gate.soft_mask(weight), torch.tensor(SOFT), atol=1e-6)
    assert gate.hard_mask(weight).tolist() == [[bool(b) for b in row] for row in HARD]

    # Forward value is exactly W ⊙ B.
    gated = gate(weight)
    assert torch.equal(gated, weight.detach() * torch.tensor(HARD, dtype=torch.float32))

    # L = Σ W_eff. With M' = M(1 − M):
    #   ∂L/∂W = B + W · M' · 2W/τ   (e.g. W=0.1: 0 + 0.1·0.213910·2 = 0.042782;
    #                                  W=0.3: 1 + 0.3·0.25·6 = 1.45)
    #   ∂L/∂t = Σ W · M' · (−2t/τ) = −6 · Σ W·M' = −0.764967
    gated.sum().backward()
    expected_weight_grad = [[0.042782, 1.698819, 1.450000],
                            [1.709481, 0.188003, 0.000000],
                            [1.424856, 1.596607, 0.306665]]
    assert torch.allclose(weight.grad, torch.tensor(expected_weight_grad), atol=1e-5)
    assert math.isclose(gate.threshold.grad.item(), -0.764967, abs_tol=1e-5)

    # Penalty Σ M (the kept-count stand-in, raw form with η = 1):
    #   ∂/∂t = Σ M' · (−2t/τ) = −6 · Σ M' = −10.882460;  ∂/∂W = M' · 2W/τ (e.g. W=0.3: 0.25·6 = 1.5)
    weight.grad = None
    gate.threshold.grad = None
    gate.soft_mask(weight).sum().backward()
    assert math.isclose(gate.threshold.grad.item(), -10.882460, abs_tol=1e-4)
    expected_penalty_grad = [[0.427819, -1.397638, 1.5], [1.773703, -0.940015, 0.0],
                             [0.708093, 1.704591, -1.226662]]
    assert torch.allclose(weight.grad, torch.tensor(expected_penalty_grad), atol=1e-5)


def test_ste_gradient_equals_soft_mask_gradient():
    """Backward through the gate is backward through W ⊙ M, except that the "mask itself"
    factor of ∂W_eff/∂W is B (what the forward used) instead of M."""
    torch.manual_seed(0)
    upstream = torch.randn(5, 7)
    weight = (0.2 * torch.randn(5, 7)).requires_grad_()
    gate = SelfPinchingGate(threshold_init=0.15, temperature=0.05)
    (gate(weight) * upstream).sum().backward()
    ste_weight_grad, ste_threshold_grad = weight.grad.clone(), gate.threshold.grad.clone()

    weight.grad, gate.threshold.grad = None, None
    soft = gate.soft_mask(weight)
    (weight * soft * upstream).sum().backward()
    assert torch.allclose(ste_threshold_grad, gate.threshold.grad, rtol=1e-6, atol=1e-7)
    hard = gate.hard_mask(weight).float()
    assert torch.allclose(ste_weight_grad, weight.grad - upstream * soft.detach() + upstream * hard, atol=1e-6)


def test_controller_switches_eta_off_at_target_and_back_on_below():
    controller = SparsityController(target=0.5, eta=2.0)
    assert controller.current_eta() == 2.0                    # starts on (sparsity 0)
    assert not controller.update(0.3, step=1) and controller.current_eta() == 2.0
    assert controller.update(0.5, step=2) and controller.current_eta() == 0.0      # at target: off
    assert not controller.update(0.55, step=3) and controller.current_eta() == 0.0
    assert controller.update(0.49, step=4) and controller.current_eta() == 2.0     # below: on again
    assert controller.first_reached == 2 and controller.switches == 2
    # The penalty is not even computed while η is off.
    method = SPG(0.5, eta=2.0, normalised_eta=True, band=None)   # the on/off controller, η'
    method.matrices = attach_gates(tiny_model())
    method.controller.update(0.6, step=1)
    assert method.extra_loss(None, 1, 10) is None
    method.controller.update(0.1, step=2)
    penalty = method.extra_loss(None, 2, 10)
    assert penalty is not None and math.isclose(penalty.item(), 2.0 * 0.5, rel_tol=0.02)  # η'·mean(M), M ≈ ½ at τ = 0.5


def test_slow_band_and_temperature_schedule():
    controller = SparsityController(target=0.6, eta=1.0, slow_band=0.1)
    controller.update(0.3, step=1)
    assert controller.current_eta() == 1.0
    controller.update(0.55, step=2)
    assert math.isclose(controller.current_eta(), 0.5)
    assert cosine_temperature(0, 100) == 0.5
    assert math.isclose(cosine_temperature(50, 100), 0.255)
    assert math.isclose(cosine_temperature(100, 100), 0.01)


def test_normalised_and_raw_penalties_agree():
    matrices = attach_gates(tiny_model())
    n = sum(m.weight.numel() for m in matrices)
    normalised = sparsity_penalty(matrices, 1.7e3, normalised=True)
    raw = sparsity_penalty(matrices, 1.7e3 / n, normalised=False)
    assert math.isclose(normalised.item(), raw.item(), rel_tol=1e-5)


def test_finalize_gives_identical_logits_and_plain_linears():
    torch.manual_seed(0)
    reference = tiny_model()
    model = tiny_model()
    matrices = attach_gates(model)
    with torch.no_grad():
        for m in matrices:
            m.gate.threshold.fill_(m.weight.abs().median())          # prune about half
    waveforms, lengths = torch.randn(2, 4000), torch.tensor([4000, 3100])
    model.eval()
    gated_logits, _ = model(waveforms, lengths)
    assert 0.45 < hard_sparsity(matrices) < 0.55
    finalize(model)
    plain_logits, _ = model(waveforms, lengths)
    assert torch.equal(gated_logits, plain_logits)
    assert not any(isinstance(module, SelfPinchingGate) for module in model.modules())
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert all(type(linear) is nn.Linear for _, linear in model.prunable_linears())
    assert set(model.state_dict()) == set(reference.state_dict())
    assert gated_matrices(model) == []
    assert 0.45 < sparsity_report(model)["sparsity"] < 0.55


def test_calibration_hits_target_with_one_common_scale():
    model = tiny_model()
    matrices = attach_gates(model)
    with torch.no_grad():
        for i, m in enumerate(matrices):
            m.gate.threshold.fill_(0.02 * (i + 1))
    before = [m.gate.threshold.item() for m in matrices]
    scale = calibrate_thresholds(matrices, 0.37)
    total = sum(m.weight.numel() for m in matrices)
    assert abs(hard_sparsity(matrices) - 0.37) <= 2 / total
    after = [m.gate.threshold.item() for m in matrices]
    assert all(math.isclose(a, b * scale, rel_tol=1e-6) for a, b in zip(after, before))


def spg_run(tmp_path, utterances, *, stop_after=None, resume=False, seed=0, **kwargs):
    model = tiny_model(seed)
    # the settings these tests were measured with: normalised η', on/off controller with resets
    method = SPG(0.5, normalised_eta=True, band=None, threshold_lr=1e-2, history_every=2, **kwargs)
    config = TrainConfig(steps=40, batch_size=3, lr=1e-3, save_every=5)
    result = train(model, utterances, config, objective=CTCObjective(),
                   method=method, checkpoint_path=tmp_path / "spg.state",
                   resume=resume, progress=False, stop_after_steps=stop_after)
    return model, method, result


def test_short_run_reaches_target_with_mixed_per_matrix_sparsity(tmp_path):
    utterances = tiny_corpus(tmp_path)
    model, method, _ = spg_run(tmp_path, utterances)
    report = sparsity_report(model)
    compression = model.compression
    assert abs(report["sparsity"] - 0.5) <= 0.01
    assert abs(compression["sparsity"] - report["sparsity"]) < 1e-9
    assert abs(compression["sparsity_before_calibration"] - 0.5) <= 0.01    # the controller alone
    per_matrix = list(report["per_matrix_sparsity"].values())
    assert max(per_matrix) - min(per_matrix) > 0.05                          # learned, not uniform
    assert compression["per_matrix_sparsity"] == report["per_matrix_sparsity"]
    assert len(method.history) == 20 and len(method.history[-1]["thresholds"]) == 12
    assert gated_matrices(model) == []


def test_resumed_run_is_bit_identical(tmp_path):
    utterances = tiny_corpus(tmp_path)
    straight, straight_method, _ = spg_run(tmp_path / "a", utterances)
    first_model, first_method, first = spg_run(tmp_path / "b", utterances, stop_after=13)
    assert first.steps_done == 13 and gated_matrices(first_model)          # not finalized yet
    resumed, resumed_method, second = spg_run(tmp_path / "b", utterances, resume=True, seed=123)
    assert second.steps_done == 40
    assert resumed_method.controller.state_dict() == straight_method.controller.state_dict()
    assert resumed_method.history == straight_method.history
    assert resumed.compression == straight.compression
    expected, got = straight.state_dict(), resumed.state_dict()
    assert set(expected) == set(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
