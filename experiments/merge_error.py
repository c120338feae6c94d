"""Measurement: how well do the merge rules preserve a model's output? (arXiv 2606.11836)

A script, run by hand (pytest does not collect it):

    python experiments/merge_error.py                               # random-weight "tiny" preset
    python experiments/merge_error.py --model models/tiny-dense.pt  # a trained model
    python experiments/merge_error.py --preset wav2vec2-base --utterances 1

For every sparsity, compresses the model with parameter clustering ("sum_out" and "mean"
merging) and with structured magnitude pruning at the same K, all without any training, and
prints per method, against the dense model on the same audio:
  * rel. logit error  = ||logits - dense logits||_F / ||dense logits||_F  (lower is better);
  * argmax agreement  = fraction of frames whose most likely token is the dense model's.
Audio: the first --utterances FLAC files under data/ (sorted), else 4 s of random noise.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spg  # noqa: E402
from spg.compress.clustering import cluster_compress, structured_magnitude_prune  # noqa: E402
from spg.wav2vec2.model import Wav2Vec2CTC, normalize_waveforms, preset  # noqa: E402


def audio(count: int) -> list[torch.Tensor]:
    files = sorted(glob.glob("data/**/*.flac", recursive=True))[:count]
    if not files:
        torch.manual_seed(0)
        return [torch.randn(1, 64000)]
    import soundfile
    return [torch.from_numpy(soundfile.read(f, dtype="float32")[0]).reshape(1, -1) for f in files]


@torch.no_grad()
def all_logits(model: Wav2Vec2CTC, waveforms: list[torch.Tensor]) -> torch.Tensor:
    outputs = []
    for w in waveforms:
        if model.config.do_normalize:
            w = normalize_waveforms(w)
        outputs.append(model(w)[0][0])
    return torch.cat(outputs)                                   # (frames, V)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint for spg.load; default: a random-weight --preset model")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--utterances", type=int, default=4)
    parser.add_argument("--mixed", action="store_true", help="variance-based mixed sparsity")
    args = parser.parse_args()

    if args.model:
        model = spg.load(args.model)
    else:
        torch.manual_seed(0)
        model = Wav2Vec2CTC(preset(args.preset)).eval()
    waveforms = audio(args.utterances)
    dense = all_logits(model, waveforms)
    print(f"model {args.model or 'random ' + args.preset}, {len(waveforms)} utterance(s), "
          f"{dense.shape[0]} frames, mixed={args.mixed}")
    for sparsity in args.sparsities:
        for name, compress in [
            ("cluster sum_out", lambda m, s: cluster_compress(m, s, merge="sum_out", mixed=args.mixed)),
            ("cluster mean", lambda m, s: cluster_compress(m, s, merge="mean", mixed=args.mixed)),
            ("magnitude", lambda m, s: structured_magnitude_prune(m, s, mixed=args.mixed)),
        ]:
            small, report = compress(model, sparsity)
            out = all_logits(small, waveforms)
            error = float((out - dense).norm() / dense.norm())
            agreement = float((out.argmax(-1) == dense.argmax(-1)).float().mean())
            print(f"s={sparsity:.2f} {name:16s} params {report['params_after']:>10,d}  "
                  f"rel. logit error {error:7.4f}  argmax agreement {agreement:6.3f}", flush=True)


if __name__ == "__main__":
    main()
