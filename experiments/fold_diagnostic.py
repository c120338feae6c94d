#!/usr/bin/env python
"""Why the exact value-bias fold can hurt: each head's folded constant against its real mean output.

    python experiments/fold_diagnostic.py [--utterances 50]

`--fold-bias` adds a removed head's constant output c_h = W_out[:, h] · b_v[h] to the out bias.
That part of the head's output is exactly constant (the attention weights sum to 1), but the
head's full output is W_out[:, h] · (A_h · (x W_v,h^T)) + c_h, and its input-dependent part has
a mean of its own. Removing the head without the fold takes away the head's whole mean output
m_h; with the fold the model keeps c_h, so it is left with an offset m_h - c_h instead of m_h.
The fold helps a head when ||m_h - c_h|| < ||m_h||. This script measures, on the shipped model
and the first test utterances, m_h (the head's contribution to out_proj's output, averaged
over all valid frames) and prints for every head ||c_h||, ||m_h||, ||m_h - c_h|| and whether the fold
brings the model closer to the dense mean output, with the heads structured magnitude pruning
removes at 30 % and 50 % marked. Data are used only to explain a data-free choice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import spg  # noqa: E402
from spg.compress.clustering import plan_kept_units  # noqa: E402
from spg.compress import merging  # noqa: E402
from spg.corpus import build_corpus  # noqa: E402
from spg.data import read_audio, read_corpus  # noqa: E402
from spg.wav2vec2 import surgery  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=50)
    args = parser.parse_args(argv)
    model = spg.load(REPO / "models" / "tiny-dense.pt").eval()
    utterances = read_corpus(build_corpus(progress=False), "test", model.vocab)[:args.utterances]
    config = model.config
    heads, width = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    sums = torch.zeros(config.num_hidden_layers, heads, config.hidden_size, dtype=torch.float64)
    frames = 0
    captured = {}
    hooks = [layer.attention.out_proj.register_forward_pre_hook(
        lambda module, inputs, block=block: captured.__setitem__(block, inputs[0]))
        for block, layer in enumerate(model.encoder.layers)]
    with torch.no_grad():
        for utterance in utterances:
            model(torch.as_tensor(read_audio(utterance), dtype=torch.float32)[None])
            for block, context in captured.items():             # (1, T, H·dv), one utterance: no padding
                w_out = model.encoder.layers[block].attention.out_proj.weight.double()     # (D, H·dv)
                per_head = context[0].double().view(-1, heads, width)                      # (T, H, dv)
                for h in range(heads):
                    sums[block, h] += (per_head[:, h] @ w_out[:, h * width:(h + 1) * width].T).sum(0)
            frames += context.shape[1]
    for hook in hooks:
        hook.remove()
    means = sums / frames                                                      # m_h, (L, H, D)
    dropped = {}
    for sparsity in (0.3, 0.5):
        kept = plan_kept_units(model, sparsity)["heads"]
        dropped[sparsity] = set()
        for block in range(config.num_hidden_layers):
            a = surgery.block_weights(model, block).attention
            units = merging.attention_head_units(*(t.detach().double().numpy() for t in (
                a.q_weight, a.q_bias, a.k_weight, a.k_bias, a.v_weight, a.v_bias, a.out_weight)), a.num_heads)
            keep = set(merging.largest_norm_units(units, kept[block]).tolist())
            dropped[sparsity] |= {(block, h) for h in range(heads) if h not in keep}
    print(f"{'block':>5}{'head':>5}{'||c_h||':>10}{'||m_h||':>10}{'||m_h - c_h||':>15}{'fold helps':>12}{'dropped at':>12}")
    helps = {0.3: [], 0.5: []}
    for block in range(config.num_hidden_layers):
        a = surgery.block_weights(model, block).attention
        for h in range(heads):
            c = (a.out_weight[:, h * width:(h + 1) * width].double() @ a.v_bias[h * width:(h + 1) * width].double())
            m = means[block, h]
            better = bool((m - c).norm() < m.norm())
            where = ", ".join(f"{100 * s:.0f}%" for s in (0.3, 0.5) if (block, h) in dropped[s])
            for s in helps:
                if (block, h) in dropped[s]:
                    helps[s].append(better)
            print(f"{block:>5}{h:>5}{c.norm():10.3f}{m.norm():10.3f}{(m - c).norm():15.3f}{'yes' if better else 'no':>12}{where:>12}")
    for s, values in helps.items():
        print(f"heads removed by structured magnitude at {100 * s:.0f}%: the fold brings the mean output closer "
              f"for {sum(values)} of {len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
