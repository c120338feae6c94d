"""Benchmark: forward time of spg's Wav2Vec2CTC vs transformers' Wav2Vec2ForCTC.

A script, run by hand (pytest does not collect it):

    python tests/bench/forward_speed.py                 # 10 s of audio, 10 rounds
    python tests/bench/forward_speed.py --seconds 4 --rounds 5 --threads 2

Both models are wav2vec2-base (`Wav2Vec2Config()` defaults: 12 blocks, hidden 768, group-norm
feature extractor) with the same weights: HF's random init, copied into ours through
spg.loading's HF config and key mapping. Batch 1, CPU, eval mode, torch.inference_mode().
After a warm-up, the two models run alternately (ours, HF, ours, HF, ...) so that both see
the same machine load; the medians are compared.

Prints the medians, the max abs logit difference, the ratio of the fastest runs, and last the line
``ours/transformers forward time: R``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from spg.wav2vec2.io import model_config_from_hf, our_key  # noqa: E402
from spg.wav2vec2.model import Wav2Vec2CTC  # noqa: E402


def build_models():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    hf_config = Wav2Vec2Config(architectures=["Wav2Vec2ForCTC"])
    hf_model = Wav2Vec2ForCTC(hf_config).eval()
    ours = Wav2Vec2CTC(model_config_from_hf(hf_config.to_dict(), "Wav2Vec2Config()"))
    ours.load_state_dict({our_key(key, "wav2vec2."): value for key, value in hf_model.state_dict().items()})
    return ours.eval(), hf_model


def timed(forward) -> float:
    start = time.perf_counter()
    forward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (default 10 s)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per model (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, hf_model = build_models()
    torch.manual_seed(1)
    waveform = torch.randn(1, int(args.seconds * 16000))
    print(f"wav2vec2-base, {args.seconds:g} s of audio, batch 1, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, HF attention: {hf_model.config._attn_implementation}")

    with torch.inference_mode():
        run_ours = lambda: ours(waveform)                        # noqa: E731
        run_hf = lambda: hf_model(waveform).logits               # noqa: E731
        for _ in range(2):                                      # warm-up
            run_ours(), run_hf()
        ours_times, hf_times = [], []
        for _ in range(args.rounds):
            ours_times.append(timed(run_ours))
            hf_times.append(timed(run_hf))
        difference = (run_ours()[0] - run_hf()).abs().max().item()

    ours_median, hf_median = statistics.median(ours_times), statistics.median(hf_times)
    print(f"ours:         median {ours_median * 1000:8.1f} ms  (min {min(ours_times) * 1000:.1f})")
    print(f"transformers: median {hf_median * 1000:8.1f} ms  (min {min(hf_times) * 1000:.1f})")
    print(f"max abs logit difference: {difference:.2e}")
    print(f"ours/transformers min time (less sensitive to load from other processes): "
          f"{min(ours_times) / min(hf_times):.2f}")
    print(f"ours/transformers forward time: {ours_median / hf_median:.2f}")


if __name__ == "__main__":
    main()
