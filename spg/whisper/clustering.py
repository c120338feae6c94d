"""Parameter clustering and structured magnitude pruning of Whisper (arXiv 2606.11836).

The paper's headline experiment compresses Whisper with no data and no training. This is
the Whisper counterpart of `spg.compress.clustering` (wav2vec2), built from the same numpy parts of
`spg.compress.kmeans` (unit vectors, k-means, merge rules, K per module, variance-based mixed K).

Modules, each compressed on its own (20 of them in tiny.en's 4 + 4 layers):
  * encoder layer i: self-attention heads; FFN neurons;
  * decoder layer i: self-attention heads; cross-attention (`encoder_attn`) heads; FFN neurons.
A head is the d rows of W_q, W_k, W_v (and the q and v biases) plus the d columns of W_out;
a neuron is row n of fc1 (and its bias) plus column n of fc2 (spg.compress.kmeans, Part 2). Whisper's
k_proj has no bias: we hand `spg.compress.kmeans` zeros for it (they add nothing to the distances
k-means sees, merge to zeros under both rules and are dropped again), and count a head's
parameters as 4·d·D + 2·d for the mixed-K budget. out_proj and fc2 biases belong to no unit
and are kept unchanged.

The smaller model is a real `Whisper` whose per-layer sizes sit in its config
(`WhisperConfig.encoder_layer_heads`, ...), so it saves and loads with `save_whisper` /
`load_whisper` (or `spg.load`). Heads keep their width d_model / heads, so the attention
scale is unchanged.

    small, report = cluster_compress(model, 0.2, merge="mean", mixed=True)
    baseline, _ = structured_magnitude_prune(model, 0.2, ks=report["kept"])
    same_as_zeroing = keep_units(model, {("encoder", 0, "self_attn"): [0, 2, 5]})

Measured on the real tiny.en (tests/bench/whisper_cluster.py, results/whisper_cluster.json):
unlike the paper's Whisper-large-v3, tiny.en does not survive data-free compression of its
heads. K = round(6 · 0.9) = 5 already removes one head in every attention module, and every
head-and-FFN setting (both merge rules, uniform or mixed K, or magnitude) ends at 90 % WER or
more on the real recordings (dense 4.2 %). In a check on two of the recordings, removing one
encoder self-attention head per layer, and nothing else, already gave 80-93 % WER.
Compressing only the FFN neurons, clustering with `mean` keeps the most: 22.5 % WER at 10 %
against 50.7 % for structured magnitude pruning.

Only torch, numpy, `spg.compress.kmeans`, `spg.whisper.model` and (for its report bookkeeping)
`spg.compress.clustering` are imported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from spg.compress import kmeans
from spg.compress.clustering import record_compression
from spg.whisper.model import Whisper

__all__ = ["MODULE_KINDS", "DEFAULT_MERGE", "cluster_compress", "structured_magnitude_prune", "keep_units",
           "plan_kept_units", "module_keys"]

PAPER = "arXiv 2606.11836"
DEFAULT_MERGE = "mean"      # the paper's wording; the same default as spg.compress.clustering

# Module kinds, the key they have in reports ("kept", "units_before", ...) and the config
# field that holds their per-layer sizes.
MODULE_KINDS = {
    ("encoder", "self_attn"): ("encoder_heads", "encoder_layer_heads"),
    ("encoder", "ffn"): ("encoder_ffn_units", "encoder_layer_ffn_dims"),
    ("decoder", "self_attn"): ("decoder_heads", "decoder_layer_heads"),
    ("decoder", "encoder_attn"): ("decoder_cross_heads", "decoder_layer_cross_heads"),
    ("decoder", "ffn"): ("decoder_ffn_units", "decoder_layer_ffn_dims"),
}

ModuleKey = tuple[str, int, str]          # (stack, layer, kind), e.g. ("decoder", 2, "encoder_attn")


def module_keys(model: Whisper) -> list[ModuleKey]:
    """Every compressible module, layer by layer: encoder (self_attn, ffn), then decoder
    (self_attn, encoder_attn, ffn)."""
    keys = []
    for stack, kinds in (("encoder", ("self_attn", "ffn")), ("decoder", ("self_attn", "encoder_attn", "ffn"))):
        for layer in range(len(getattr(model, stack).layers)):
            keys += [(stack, layer, kind) for kind in kinds]
    return keys


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


@dataclass
class _Module:
    key: ModuleKey
    units: kmeans.ModuleUnits
    unit_size: int           # real parameters per unit (no k bias)
    variance: float          # of the module's weight matrices


def _read_module(model: Whisper, key: ModuleKey) -> _Module:
    stack, layer, kind = key
    block = getattr(model, stack).layers[layer]
    d_model = model.config.d_model
    if kind == "ffn":
        fc1, fc2 = block.fc1, block.fc2
        units = kmeans.ffn_neuron_units(_numpy(fc1.weight), _numpy(fc1.bias), _numpy(fc2.weight))
        return _Module(key, units, units.unit_size, kmeans.weight_variance(_numpy(fc1.weight), _numpy(fc2.weight)))
    attention = getattr(block, kind)
    q, k, v, out = attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj
    no_k_bias = np.zeros(k.weight.shape[0])
    units = kmeans.attention_head_units(_numpy(q.weight), _numpy(q.bias), _numpy(k.weight), no_k_bias,
                                        _numpy(v.weight), _numpy(v.bias), _numpy(out.weight), attention.num_heads)
    head_dim = attention.head_dim
    variance = kmeans.weight_variance(_numpy(q.weight), _numpy(k.weight), _numpy(v.weight), _numpy(out.weight))
    return _Module(key, units, 4 * head_dim * d_model + 2 * head_dim, variance)


def _modules(model: Whisper) -> list[_Module]:
    return [_read_module(model, key) for key in module_keys(model)]


# ----------------------------------------------------------------------------------------
# Building the smaller model
# ----------------------------------------------------------------------------------------

def _module_tensors(key: ModuleKey, units: kmeans.ModuleUnits, d_model: int) -> dict[str, np.ndarray]:
    """State-dict entries (names relative to the layer) for a module holding `units`."""
    if key[2] == "ffn":
        arrays = kmeans.ffn_weights_from_units(units)
        return {"fc1.weight": arrays["fc1_weight"], "fc1.bias": arrays["fc1_bias"], "fc2.weight": arrays["fc2_weight"]}
    arrays = kmeans.attention_weights_from_units(units, d_model)
    prefix = key[2]
    return {f"{prefix}.q_proj.weight": arrays["q_weight"], f"{prefix}.q_proj.bias": arrays["q_bias"],
            f"{prefix}.k_proj.weight": arrays["k_weight"],                 # k_bias (zeros) is dropped
            f"{prefix}.v_proj.weight": arrays["v_weight"], f"{prefix}.v_proj.bias": arrays["v_bias"],
            f"{prefix}.out_proj.weight": arrays["out_weight"]}


def _install(model: Whisper, new_units: Mapping[ModuleKey, kmeans.ModuleUnits]) -> Whisper:
    """A new Whisper whose listed modules hold `new_units` (everything else copied). The
    per-layer sizes of every module go into the new config; same device, dtype and mode."""
    config = copy.deepcopy(model.config)
    for (stack, kind), (_, field) in MODULE_KINDS.items():
        layers = len(getattr(model, stack).layers)
        sizes = []
        for layer in range(layers):
            key = (stack, layer, kind)
            if key in new_units:
                sizes.append(new_units[key].num_units)
            else:
                block = getattr(model, stack).layers[layer]
                sizes.append(block.fc1.out_features if kind == "ffn" else getattr(block, kind).num_heads)
        setattr(config, field, sizes)
    state = dict(model.state_dict())
    reference = model.decoder.embed_tokens.weight
    for key, units in new_units.items():
        stack, layer, _ = key
        for name, array in _module_tensors(key, units, config.d_model).items():
            state[f"{stack}.layers.{layer}.{name}"] = torch.from_numpy(np.ascontiguousarray(array)).to(
                device=reference.device, dtype=reference.dtype)
    new = Whisper(config).to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state)
    new.train(model.training)
    new.tokenizer = model.tokenizer
    new.compression = copy.deepcopy(model.compression)
    return new


def _check_key(model: Whisper, key: ModuleKey) -> ModuleKey:
    stack, layer, kind = key
    if (stack, kind) not in MODULE_KINDS or not 0 <= int(layer) < len(getattr(model, stack).layers):
        raise ValueError(f"no module {key!r}: expected (stack, layer, kind) with kind self_attn or ffn "
                         "(encoder) or self_attn, encoder_attn or ffn (decoder)")
    return stack, int(layer), kind


@torch.no_grad()
def keep_units(model: Whisper, keep: Mapping[ModuleKey, Sequence[int]]) -> Whisper:
    """New model keeping, in each listed module, only the given heads / FFN neurons
    (original indices, any order; an empty list removes them all, leaving only the output
    bias). E.g. {("decoder", 1, "encoder_attn"): [0, 3], ("encoder", 0, "ffn"): range(100)}."""
    new_units = {}
    for key, indices in keep.items():
        key = _check_key(model, key)
        module = _read_module(model, key)
        indices = sorted(int(i) for i in indices)
        if len(set(indices)) != len(indices) or any(not 0 <= i < module.units.num_units for i in indices):
            raise ValueError(f"{key}: kept units {indices} must be distinct and in 0..{module.units.num_units - 1}")
        new_units[key] = module.units.select(np.array(indices, dtype=np.int64))
    return _install(model, new_units)


# ----------------------------------------------------------------------------------------
# K per module, clustering, magnitude
# ----------------------------------------------------------------------------------------

def _per_kind(modules: list[_Module], values: list) -> dict[str, list]:
    """{"encoder_heads": [per layer], "encoder_ffn_units": [...], ...} from per-module values."""
    result: dict[str, list] = {name: [] for name, _ in MODULE_KINDS.values()}
    for module, value in zip(modules, values):
        result[MODULE_KINDS[(module.key[0], module.key[2])][0]].append(value)
    return result


def _kept_per_module(modules: list[_Module], sparsity: float, mixed: bool,
                     ks: Optional[dict]) -> tuple[list[int], Optional[list[str]]]:
    """K per module: the given `ks` (a report's "kept"), else uniform or variance-based mixed K."""
    if ks is not None:
        result = []
        for module in modules:
            name = MODULE_KINDS[(module.key[0], module.key[2])][0]
            k = int(ks[name][module.key[1]])
            if not 0 <= k <= module.units.num_units:
                raise ValueError(f"{module.key}: cannot keep {k} of {module.units.num_units} units")
            result.append(k)
        return result, None
    num_units = [m.units.num_units for m in modules]
    if not mixed:
        return [kmeans.kept_units(n, sparsity) for n in num_units], None
    return kmeans.mixed_kept_units(num_units, [m.unit_size for m in modules], [m.variance for m in modules],
                                   sparsity)


def plan_kept_units(model: Whisper, sparsity: float, *, mixed: bool = False) -> dict[str, list[int]]:
    """The K per module `cluster_compress` / `structured_magnitude_prune` would use."""
    modules = _modules(model)
    return _per_kind(modules, _kept_per_module(modules, sparsity, mixed, None)[0])


def _record(model: Whisper, new_model: Whisper, modules: list[_Module], record: dict,
            groups: Optional[list[str]]) -> dict:
    record["units_before"] = _per_kind(modules, [m.units.num_units for m in modules])
    if groups is not None:
        record["variance_group"] = _per_kind(modules, groups)
    return record_compression(model, new_model, record)      # parameter counts; new_model.compression


@torch.no_grad()
def cluster_compress(model: Whisper, sparsity: float, *, merge: str = DEFAULT_MERGE, mixed: bool = False,
                     seed: int = 0, n_init: int = 1, ks: Optional[dict] = None) -> tuple[Whisper, dict]:
    """Parameter clustering (arXiv 2606.11836) of every Whisper module's heads / neurons.

    K per module: round(N (1 - sparsity)), or variance-based mixed K (`mixed`, over all 20
    modules of tiny.en together), or the given `ks` (a report's "kept"). merge: "mean" or
    "sum_out" (spg.compress.kmeans.merge_units). Returns (new model, report); the input is not
    modified. report = {"method": "parameter_clustering", "paper", "sparsity", "merge",
    "mixed", "seed", "kept": {"encoder_heads": [per layer], "encoder_ffn_units", "decoder_heads",
    "decoder_cross_heads", "decoder_ffn_units"}, "inertia" (same layout), "units_before",
    "variance_group" (mixed only), "params_before", "params_after"}; it is also stored in
    new_model.compression."""
    if merge not in kmeans.MERGE_RULES:
        raise ValueError(f"merge must be one of {kmeans.MERGE_RULES}; got {merge!r}")
    modules = _modules(model)
    kept, groups = _kept_per_module(modules, sparsity, mixed, ks)
    new_units, inertias = {}, []
    for module, k in zip(modules, kept):
        merged, _labels, inertia = kmeans.cluster_units(module.units, k, merge=merge, seed=seed, n_init=n_init)
        new_units[module.key] = merged
        inertias.append(float(inertia))
    new_model = _install(model, new_units)
    record = {"method": "parameter_clustering", "paper": PAPER, "sparsity": float(sparsity), "merge": merge,
              "mixed": bool(mixed and ks is None), "seed": int(seed),
              "kept": _per_kind(modules, [new_units[m.key].num_units for m in modules]),
              "inertia": _per_kind(modules, inertias)}
    return new_model, _record(model, new_model, modules, record, groups)


@torch.no_grad()
def structured_magnitude_prune(model: Whisper, sparsity: float, *, mixed: bool = False,
                               ks: Optional[dict] = None) -> tuple[Whisper, dict]:
    """The paper's baseline: keep in every module the K units with the largest L2 norm of the
    unit vector clustering uses (spg.compress.kmeans.largest_norm_units); K as in `cluster_compress`.
    Returns (new model, report) with "method": "structured_magnitude"."""
    modules = _modules(model)
    kept, groups = _kept_per_module(modules, sparsity, mixed, ks)
    new_units = {m.key: m.units.select(kmeans.largest_norm_units(m.units, k)) for m, k in zip(modules, kept)}
    new_model = _install(model, new_units)
    record = {"method": "structured_magnitude", "paper": PAPER, "sparsity": float(sparsity),
              "mixed": bool(mixed and ks is None), "kept": _per_kind(modules, kept)}
    return new_model, _record(model, new_model, modules, record, groups)
