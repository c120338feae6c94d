#!/usr/bin/env python
"""What the Whisper-CTC model's input choice costs the pretrained encoder: no 30 s padding.

    OMP_WAIT_POLICY=PASSIVE python experiments/whisper_ctc_window.py [--utterances 20]

`spg.whisper.ctc.WhisperCTC` runs Whisper's encoder on the utterance alone (its log-mel, the
first T positional embeddings), not on the 30 s window Whisper was trained on. This measures
what that does to the pretrained model, before any CTC training, through Whisper's own
decoder (greedy, same prompt and suppression): the same utterances decoded once from the
30 s window (log-mel of the zero-padded window, as Whisper was trained) and once from the
unpadded log-mel (what the CTC model's encoder sees). Sets: the 11 real recordings in
recordings/ and the first --utterances of the built-in test split. Prints WER/CER of both
inputs per set, MAPSSWE between them, and the encoder's forward time on a 3 s utterance
either way (ours / padded, the ratio last).

Writes results/whisper_ctc_window.json (--json to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import spg  # noqa: E402
from spg.files import atomic_write  # noqa: E402
from spg.corpus import build_corpus  # noqa: E402
from spg.data import read_audio, read_corpus  # noqa: E402
from spg.text import normalize_english  # noqa: E402
from spg.wer import corpus_scores, mapsswe  # noqa: E402
from spg.whisper.audio import log_mel_spectrogram  # noqa: E402
from spg.whisper.evaluation import read_transcription_folder  # noqa: E402

REAL = ("librivox", "cards", "beckett")


def decode(model, utterances, *, padded: bool) -> list[str]:
    texts = []
    for utterance in utterances:
        waveform = read_audio(utterance)
        mel = log_mel_spectrogram(waveform, model.config.num_mel_bins, **({} if padded else {"n_samples": None}))
        (ids,) = model.greedy_decode(mel[None])
        texts.append(normalize_english(model.tokenizer.decode(ids)))
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--utterances", type=int, default=20, help="of the built-in test split (default 20)")
    parser.add_argument("--json", default=str(REPO / "results" / "whisper_ctc_window.json"))
    args = parser.parse_args(argv)
    model = spg.load(args.model)
    sets = {"real": [u for name in REAL for u in read_transcription_folder(REPO / "recordings" / name)],
            "test": read_corpus(build_corpus(), "test")[:args.utterances]}
    rows = {}
    for name, utterances in sets.items():
        references = [normalize_english(u.transcript) for u in utterances]
        hypotheses = {kind: decode(model, utterances, padded=kind == "padded") for kind in ("padded", "unpadded")}
        scores = {kind: corpus_scores(references, h) for kind, h in hypotheses.items()}
        test = mapsswe(references, hypotheses["unpadded"], hypotheses["padded"], alpha=0.05)
        rows[name] = {"utterances": len(utterances),
                      **{kind: {"wer": s["wer"], "cer": s["cer"]} for kind, s in scores.items()},
                      "mapsswe": {"p_value": test.p_value, "significant": test.significant,
                                  "unpadded_worse": test.mean_difference > 0},
                      "hypotheses": hypotheses, "references": references}
        print(f"{name:<6} ({len(utterances)} utterances): WER padded {100 * scores['padded']['wer']:.2f}%, "
              f"unpadded {100 * scores['unpadded']['wer']:.2f}%; MAPSSWE p = {test.p_value:.3g}")
    waveform = read_audio(sets["test"][0])[:48000]
    times = {}
    with torch.inference_mode():
        for kind in ("padded", "unpadded"):
            mel = log_mel_spectrogram(waveform, **({} if kind == "padded" else {"n_samples": None}))[None]
            model.encoder(mel)
            samples = []
            for _ in range(5):
                begin = time.perf_counter()
                model.encoder(mel)
                samples.append(time.perf_counter() - begin)
            times[kind] = sorted(samples)[2]
    result = {"model": args.model, "sets": rows, "encoder_seconds_3s": times,
              "encoder_time_ratio_unpadded_over_padded": times["unpadded"] / times["padded"]}
    atomic_write(args.json, lambda file: file.write(json.dumps(result, indent=1).encode()))
    print(f"encoder forward on 3 s: padded {1000 * times['padded']:.0f} ms, unpadded "
          f"{1000 * times['unpadded']:.0f} ms")
    print(f"ratio unpadded / padded: {times['unpadded'] / times['padded']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
