"""Parameter clustering of a whole model: data-free, training-free structured compression.

arXiv 2606.11836: in every attention module, cluster the heads, and in every FFN the
neurons, with k-means on their parameter vectors and merge each cluster into one unit. No
data and no gradients are used; the result is a smaller dense model (fewer heads, a
narrower FFN). The structured magnitude pruning baseline of the paper (drop the units with
the smallest norm, same number kept per module) is here too.

One implementation for every model family: it sees a model only through
`spg.compress.interface` (`structured_units()` and `rebuild()`), so wav2vec2/HuBERT (one
self-attention and one FFN per block) and Whisper (encoder self-attention and FFN; decoder
self-attention, cross-attention and FFN: 20 modules in tiny.en) are compressed alike, each
module on its own. This module is the thin glue between the two halves:
  * spg.compress.merging (numpy only): unit vectors, merge rules, how many units to keep, with
    the k-means of spg.compress.kmeans;
  * the model's `rebuild`: building the smaller model from given weights.

A head is the d rows of W_q, W_k, W_v (and their biases) plus the d columns of W_out; a
neuron is row n of fc1 (and its bias) plus column n of fc2 (spg.compress.merging).
A model whose k_proj has no bias (Whisper) hands `spg.compress.merging` zeros for it (they add
nothing to the distances k-means sees, merge to zeros under both rules and are dropped again),
and a head then counts 4·d·D + 2·d parameters for the mixed-K budget. out_proj and fc2 biases
belong to no unit and are kept unchanged.

    new_model, report = cluster_compress(model, 0.5)                  # mean, uniform
    new_model, report = cluster_compress(model, 0.5, merge="sum_out", mixed=True)
    baseline, _ = structured_magnitude_prune(model, 0.5, ks=report["kept"])

Both return a NEW model (the argument is not modified) whose `compression` dict records
the method and the K per module, and a report (plain data) with the same record plus
parameter counts and k-means inertias. Per-module figures are listed per report group and
layer (`AttentionUnits.group`): {"heads": [...], "ffn_units": [...]} for wav2vec2,
{"encoder_heads", "encoder_ffn_units", "decoder_heads", "decoder_cross_heads",
"decoder_ffn_units"} for Whisper.

What this measures on the real Whisper tiny.en (experiments/whisper_cluster.py) is in
README.md, "Data-free clustering", and results/whisper_cluster.json.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from spg.compress import merging
from spg.compress.interface import (AttentionUnits, AttentionWeights, FeedForwardWeights, ModuleWeights,
                                    PrunableModel, StructuredUnits)

__all__ = ["DEFAULT_MERGE", "cluster_compress", "structured_magnitude_prune", "plan_kept_units", "record_compression",
           "module_shapes", "structured_magnitude_to_shapes"]

# Default merge rule: "mean", the paper's wording; how it compares with our sum_out and
# representative rules depends on the model (the README's clustering tables, measured on the
# shipped model and on the Whisper-CTC testbed).
DEFAULT_MERGE = merging.DEFAULT_MERGE

PAPER = "arXiv 2606.11836"


@dataclass
class _Module:
    """One attention module or FFN, as numpy units."""

    source: StructuredUnits
    units: merging.ModuleUnits
    unit_size: int                  # parameters per unit (for the mixed-K budget)
    variance: float                 # variance of the module's weight matrices


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _read_module(source: StructuredUnits) -> _Module:
    if not isinstance(source, AttentionUnits):
        fc1, fc2 = source.fc1, source.fc2
        units = merging.ffn_neuron_units(_numpy(fc1.weight), _numpy(fc1.bias), _numpy(fc2.weight))
        return _Module(source, units, units.unit_size, merging.weight_variance(_numpy(fc1.weight), _numpy(fc2.weight)))
    widths = set(source.qk_head_dims) | set(source.v_head_dims)
    if len(widths) > 1:
        raise ValueError(f"{source.name}: heads of different widths {list(source.qk_head_dims)} / "
                         f"{list(source.v_head_dims)} cannot be compared as units; compress a model with whole heads")
    q, k, v, out = source.q_proj, source.k_proj, source.v_proj, source.out_proj
    k_bias = _numpy(k.bias) if k.bias is not None else np.zeros(k.weight.shape[0])
    units = merging.attention_head_units(_numpy(q.weight), _numpy(q.bias), _numpy(k.weight), k_bias,
                                        _numpy(v.weight), _numpy(v.bias), _numpy(out.weight), source.num_heads)
    d, hidden = source.head_dim, source.hidden_size
    unit_size = units.unit_size if k.bias is not None else 4 * d * hidden + 2 * d
    variance = merging.weight_variance(_numpy(q.weight), _numpy(k.weight), _numpy(v.weight), _numpy(out.weight))
    return _Module(source, units, unit_size, variance)


def _modules(model: PrunableModel) -> list[_Module]:
    """Every attention module and FFN of `model`, in its `structured_units()` order."""
    return [_read_module(source) for source in model.structured_units()]


MIXED_RANKINGS = (False, True, "per_kind")    # uniform K; variances ranked over all modules; within each kind


def _plan(modules: list[_Module], sparsity: float, mixed) -> tuple[list[int], Optional[list[str]]]:
    """K for every module (uniform, or variance-based mixed over all modules, or per kind
    with mixed="per_kind"), and the variance groups."""
    if mixed not in MIXED_RANKINGS:
        raise ValueError(f"mixed must be one of {MIXED_RANKINGS}; got {mixed!r}")
    num_units = [m.units.num_units for m in modules]
    if not mixed:
        return [merging.kept_units(n, sparsity) for n in num_units], None
    sizes, variances = [m.unit_size for m in modules], [m.variance for m in modules]
    if mixed == "per_kind":
        return merging.mixed_kept_units_per_kind(num_units, sizes, variances, sparsity,
                                                [m.source.group for m in modules])
    return merging.mixed_kept_units(num_units, sizes, variances, sparsity)


def _per_group(modules: list[_Module], values: list) -> dict[str, list]:
    """{group: [value per layer]} from per-module values, e.g. {"heads": [...], "ffn_units": [...]}."""
    result: dict[str, list] = {}
    for module, value in zip(modules, values):
        result.setdefault(module.source.group, []).append(value)
    return result


def _ks_from_argument(modules: list[_Module], ks: dict) -> list[int]:
    """Per-module K from {group: [K per layer]} (e.g. a report's "kept")."""
    result = []
    for m in modules:
        k = int(ks[m.source.group][m.source.layer])
        if not 0 <= k <= m.units.num_units:
            raise ValueError(f"{m.source.name}: cannot keep {k} of {m.units.num_units} units")
        result.append(k)
    return result


def _kept_per_module(modules: list[_Module], sparsity: float, mixed: bool,
                     ks: Optional[dict]) -> tuple[list[int], Optional[list[str]]]:
    """K per module: the given `ks`, else the uniform or variance-based mixed plan."""
    if ks is not None:
        return _ks_from_argument(modules, ks), None
    return _plan(modules, sparsity, mixed)


def plan_kept_units(model: PrunableModel, sparsity: float, *, mixed: bool = False) -> dict[str, list[int]]:
    """The K per module that `cluster_compress` / `structured_magnitude_prune` would use:
    {group: [K per layer]}, e.g. {"heads": [...], "ffn_units": [...]}."""
    modules = _modules(model)
    return _per_group(modules, _plan(modules, sparsity, mixed)[0])


def value_bias_constant(weights: AttentionWeights) -> torch.Tensor:
    """(D,) W_out · b_v: what the value biases add to EVERY output position. Exact for any
    input, because each query's attention weights sum to 1 (softmax)."""
    return weights.out_weight @ weights.v_bias


def fold_value_bias(weights: AttentionWeights, before: AttentionWeights) -> AttentionWeights:
    """A copy of `weights` whose out_bias also carries the value-bias constant that `before`
    (the module before some heads were dropped or merged) had and these weights lost:
    out_bias + W_out_before · b_v_before − W_out · b_v. Exact and data-free: the module's
    output then differs from `before`'s only by the dropped heads' input-dependent part
    (on a zero input, not at all). Ours, not in the papers."""
    folded = weights.out_bias + value_bias_constant(before) - value_bias_constant(weights)
    return dataclasses.replace(weights, out_bias=folded)


def _to_tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=like.device, dtype=like.dtype)


def _weights_from_units(module: _Module, units: merging.ModuleUnits, fold_bias: bool = False) -> ModuleWeights:
    """The module's new weights holding `units` (its output bias unchanged, or with
    `fold_bias` an attention module's out bias corrected by `fold_value_bias`)."""
    source = module.source
    if not isinstance(source, AttentionUnits):
        like = source.fc1.weight
        arrays = merging.ffn_weights_from_units(units)
        return FeedForwardWeights(**{name: _to_tensor(value, like) for name, value in arrays.items()},
                                  fc2_bias=source.fc2.bias.detach().clone())     # belongs to no neuron
    like = source.q_proj.weight
    arrays = merging.attention_weights_from_units(units, source.hidden_size)
    head_dim = arrays["q_weight"].shape[0] // units.num_units if units.num_units else 0
    tensors = {name: _to_tensor(value, like) for name, value in arrays.items()}
    if source.k_proj.bias is None:
        del tensors["k_bias"]                                   # the zeros handed to merging
    weights = AttentionWeights(**{"k_bias": None, **tensors},
                               out_bias=source.out_proj.bias.detach().clone(),   # belongs to no head
                               qk_head_dims=[head_dim] * units.num_units, v_head_dims=[head_dim] * units.num_units)
    return fold_value_bias(weights, source.weights()) if fold_bias else weights


def record_compression(model: PrunableModel, new_model: PrunableModel, record: dict) -> dict:
    """Add parameter counts, store the record in `new_model.compression` (any earlier record
    of the input model is kept under "previous"), and return the report."""
    record["params_before"] = model.num_parameters()
    record["params_after"] = new_model.num_parameters()
    previous = copy.deepcopy(model.compression)
    new_model.compression = dict(record, previous=previous) if previous else dict(record)
    return record


@torch.no_grad()
def cluster_compress(model: PrunableModel, sparsity: float, *, merge: str = DEFAULT_MERGE, mixed=False,
                     seed: int = 0, n_init: int = 1, ks: Optional[dict] = None, min_similarity: Optional[float] = None,
                     fold_bias: bool = False) -> tuple[PrunableModel, dict]:
    """Parameter clustering (arXiv 2606.11836) of every module's heads / FFN neurons.

    sparsity: s; every module keeps K = round(N * (1 - s)) units, or the variance-based
        mixed K when `mixed` (over all modules together, see
        `spg.compress.merging.mixed_kept_units`), or the given `ks` ({group: [K per layer]},
        e.g. a report's "kept"; then `mixed` is ignored).
    merge: "mean" (the centroid, the paper's), "sum_out" (input sides averaged, output sides
        summed; ours) or "representative" (the member nearest the centroid; ours); see
        `spg.compress.merging.merge_units`, which also explains `min_similarity` (ours: merge
        only clusters whose members are that cosine-similar to their centroid).
    mixed: False, True (variances ranked over all modules, the paper's) or "per_kind" (ours:
        attention modules and FFNs ranked separately, each kind keeping its uniform budget).
    fold_bias: add a removed or merged head's constant output W_out[:, h] · b_v[h] to the
        out bias (ours; exact and data-free, `fold_value_bias`).
    seed, n_init: k-means seeding (every module uses the same seed).

    Returns (new_model, report). The input model is not modified. report (also stored in
    new_model.compression) = {"method": "parameter_clustering", "paper", "sparsity",
    "merge", "mixed", "seed", "kept": {group: [K per layer]}, "units_before": same layout,
    "inertia": same layout, "variance_group" (mixed only), "params_before", "params_after"}.
    """
    if merge not in merging.MERGE_RULES:
        raise ValueError(f"merge must be one of {merging.MERGE_RULES}; got {merge!r}")
    modules = _modules(model)
    kept, groups = _kept_per_module(modules, sparsity, mixed, ks)
    new_units, inertias = [], []
    for module, k in zip(modules, kept):
        merged, _labels, inertia = merging.cluster_units(module.units, k, merge=merge, seed=seed, n_init=n_init,
                                                        min_similarity=min_similarity)
        new_units.append(merged)
        inertias.append(inertia)
    new_model = model.rebuild({m.source.name: _weights_from_units(m, units, fold_bias)
                               for m, units in zip(modules, new_units)})
    record = {"method": "parameter_clustering", "paper": PAPER, "sparsity": float(sparsity), "merge": merge,
              "mixed": (mixed if mixed == "per_kind" else bool(mixed)) if ks is None else False, "seed": int(seed),
              "min_similarity": min_similarity, "fold_bias": bool(fold_bias),
              "kept": _per_group(modules, [u.num_units for u in new_units]),
              "units_before": _per_group(modules, [m.units.num_units for m in modules]),
              "inertia": _per_group(modules, [float(x) for x in inertias])}
    if groups is not None:
        record["variance_group"] = _per_group(modules, groups)
    return new_model, record_compression(model, new_model, record)


@torch.no_grad()
def structured_magnitude_prune(model: PrunableModel, sparsity: float, *, mixed=False,
                               ks: Optional[dict] = None, fold_bias: bool = False) -> tuple[PrunableModel, dict]:
    """The paper's baseline: in every module keep the K units with the largest L2 norm of
    their unit vector (the same vector clustering uses) and drop the rest.

    K per module as in `cluster_compress` (uniform, mixed, or given `ks`, e.g. a clustering
    report's "kept"); `fold_bias` as there. Returns (new_model, report) like `cluster_compress`, with
    "method": "structured_magnitude" and no merge/inertia entries."""
    modules = _modules(model)
    kept, groups = _kept_per_module(modules, sparsity, mixed, ks)
    weights: dict[str, ModuleWeights] = {}
    for module, k in zip(modules, kept):
        keep = merging.largest_norm_units(module.units, k).tolist()
        current = module.source.weights()
        if isinstance(current, AttentionWeights):
            kept_heads = current.keep_heads(keep)
            weights[module.source.name] = fold_value_bias(kept_heads, current) if fold_bias else kept_heads
        else:
            weights[module.source.name] = current.keep_units(keep)
    new_model = model.rebuild(weights)
    record = {"method": "structured_magnitude", "paper": PAPER, "sparsity": float(sparsity),
              "mixed": (mixed if mixed == "per_kind" else bool(mixed)) if ks is None else False,
              "fold_bias": bool(fold_bias), "kept": _per_group(modules, kept),
              "units_before": _per_group(modules, [m.units.num_units for m in modules])}
    if groups is not None:
        record["variance_group"] = _per_group(modules, groups)
    return new_model, record_compression(model, new_model, record)


def module_shapes(model: PrunableModel) -> dict[str, dict]:
    """{module name: {"qk_head_dims": [...], "v_head_dims": [...]} or {"units": N}}: the
    structure of every attention module and FFN of `model` (e.g. an L0-pruned one)."""
    return {units.name: ({"qk_head_dims": list(units.qk_head_dims), "v_head_dims": list(units.v_head_dims)}
                         if isinstance(units, AttentionUnits) else {"units": units.num_units})
            for units in model.structured_units()}


def _prunable_count(model: PrunableModel) -> int:
    return sum(linear.weight.numel() for _, linear in model.prunable_linears())


@torch.no_grad()
def structured_magnitude_to_shapes(model: PrunableModel, shapes: dict[str, dict], *,
                                   fold_bias: bool = False) -> tuple[PrunableModel, dict]:
    """Structured magnitude pruning of `model` to the given per-module structure
    (`module_shapes` of another model, e.g. L0's learned one): the baseline L0 is judged
    against, at exactly its sizes. Not from a paper; our rules, all by L2 norm:

      * heads: keep as many as the target module has, those with the largest norm of their
        unit vector (as `structured_magnitude_prune`);
      * widths: the target's query/key and value widths, sorted widest first, go to the kept
        heads in order of decreasing norm (the strongest head gets the widest budget);
      * within a head: the query/key dims j with the largest ||W_q[j]||² + ||W_k[j]||² (with
        biases), the value dims with the largest ||W_v[j]||² + b_v[j]² + ||W_out[:, j]||²;
      * FFN: the neurons with the largest norm of their unit vector.

    Returns (new_model, report) with report["sparsity"] the removed fraction of the prunable
    weights and report["shapes"] the new model's `module_shapes` (equal to `shapes`)."""
    modules = _modules(model)
    weights: dict[str, ModuleWeights] = {}
    for module in modules:
        name, source = module.source.name, module.source
        if name not in shapes:
            raise ValueError(f"the target structure has no module {name}")
        target, current = shapes[name], source.weights()
        if not isinstance(source, AttentionUnits):
            weights[name] = current.keep_units(merging.largest_norm_units(module.units, int(target["units"])).tolist())
            continue
        qk_widths = sorted(target["qk_head_dims"], reverse=True)
        v_widths = sorted(target["v_head_dims"], reverse=True)
        if len(qk_widths) > current.num_heads or any(w > source.head_dim for w in qk_widths + v_widths):
            raise ValueError(f"{name}: the target structure {target} does not fit {current.num_heads} heads of "
                             f"{source.head_dim}")
        norms = np.linalg.norm(module.units.vectors(), axis=1)
        heads = merging.largest_indices(norms, len(qk_widths)).tolist()
        by_strength = sorted(heads, key=lambda h: (-norms[h], h))
        qk_dims, v_dims = [[] for _ in range(current.num_heads)], [[] for _ in range(current.num_heads)]
        qk_slices, v_slices = source.qk_slices(), source.v_slices()
        for rank, head in enumerate(by_strength):
            rows, columns = qk_slices[head], v_slices[head]
            qk_score = current.q_weight[rows].square().sum(1) + current.k_weight[rows].square().sum(1) \
                + current.q_bias[rows].square() + (0 if current.k_bias is None else current.k_bias[rows].square())
            v_score = current.v_weight[columns].square().sum(1) + current.v_bias[columns].square() \
                + current.out_weight[:, columns].square().sum(0)
            qk_dims[head] = merging.largest_indices(qk_score.double().numpy(), qk_widths[rank]).tolist()
            v_dims[head] = merging.largest_indices(v_score.double().numpy(), v_widths[rank]).tolist()
        pruned = current.keep_head_dims(qk_dims, v_dims)
        weights[name] = fold_value_bias(pruned, current) if fold_bias else pruned
    new_model = model.rebuild(weights)
    record = {"method": "structured_magnitude_to_shapes", "fold_bias": bool(fold_bias),
              "sparsity": 1.0 - _prunable_count(new_model) / _prunable_count(model),
              "shapes": module_shapes(new_model)}
    return new_model, record_compression(model, new_model, record)
