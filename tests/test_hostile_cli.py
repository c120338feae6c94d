"""train.py and evaluate.py under hostile or careless input: usage errors (exit 2), one-line
errors for bad files, bad data, a full disk or diverged training (exit 1), nothing executed
from a planted resume state, leftovers of interrupted saves removed, settings kept on resume."""

import errno
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_corpus
from test_cli import noise_corpus
from test_training import NanWeightAfterStepThree, Planted, tiny_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate  # noqa: E402
import spg  # noqa: E402
import spg.experiment  # noqa: E402
import train  # noqa: E402


def one_line_error(capsys, program: str) -> str:
    """The one error line on stderr (progress bars aside), and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith(f"{program}: error: "), err
    return errors[0]


@pytest.mark.parametrize("flag, value", [
    ("--steps", "0"), ("--steps", "-5"), ("--steps", "x"), ("--batch-size", "0"), ("--batch-size", "-1"),
    ("--save-every", "-1"), ("--warmup", "1"), ("--warmup", "-0.1"), ("--warmup", "nan"), ("--stop-after", "-3"),
    ("--stop-after", "0"), ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "inf"), ("--epochs", "-1"),
    ("--eval-every", "-2"), ("--threshold-lr", "0"), ("--eta", "-1"), ("--eta-raw", "-1e-5"),
    ("--weight-decay", "-0.1"), ("--dropout", "1.5"), ("--tau-start", "0"), ("--tau-end", "-1"),
    ("--threshold-init", "nan"), ("--sparsity", "1"), ("--sparsity", "-0.2"), ("--seed", "-1"),
    ("--eval-utterances", "0"), ("--max-seconds", "0"), ("--max-seconds", "-3"), ("--device", "gpu7"),
])
def test_senseless_train_values_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main([flag, value, "--data", "/no/such/corpus"])     # refused before any data is read
    assert stopped.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--method", "l0", "--sparsity", "0.7", "--min-heads", "1", "--dims-only"], "--min-heads needs head gates"),
    (["--method", "ump", "--sparsity", "0.7", "--min-heads", "1"], "options of --method l0"),
    (["--method", "spg", "--sparsity", "0.7", "--dims-only"], "options of --method l0"),
    (["--method", "gmp", "--sparsity", "0.7", "--target-ramp", "0.1"], "options of --method l0"),
    (["--method", "l0", "--sparsity", "0.7", "--target-ramp", "1"], "argument --target-ramp"),
    (["--method", "l0", "--sparsity", "0.7", "--min-heads", "-1"], "argument --min-heads"),
])
def test_l0_variant_options_that_cannot_apply_are_usage_errors(options, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main([*options, "--data", "/no/such/corpus"])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-seconds", "0"), ("--max-seconds", "nan"), ("--device", "gpu7")])
def test_senseless_evaluate_values_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([flag, value, "--data", "/no/such/corpus"])
    assert stopped.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_missing_or_corrupt_model_and_bad_data_give_one_line(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    missing = tmp_path / "no-such-model.pt"
    assert train.main(["--model", str(missing), "--data", str(data), "--out", str(tmp_path / "x.pt")]) == 1
    assert str(missing) in one_line_error(capsys, "train.py")
    assert evaluate.main(["--model", str(missing), "--data", str(data)]) == 1
    assert str(missing) in one_line_error(capsys, "evaluate.py")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    assert evaluate.main(["--model", str(corrupt), "--data", str(data)]) == 1
    assert str(corrupt) in one_line_error(capsys, "evaluate.py")

    good = tmp_path / "good.pt"
    spg.save(tiny_model(), good)
    assert evaluate.main(["--model", str(good), "--data", str(data), "--split", "no-such-split"]) == 1
    assert "no-such-split" in one_line_error(capsys, "evaluate.py")


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    data = noise_corpus(tmp_path / "corpus")
    good = tmp_path / "good.pt"
    spg.save(tiny_model(), good)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(evaluate, "describe", broken)
    with pytest.raises(ZeroDivisionError):
        evaluate.main(["--model", str(good), "--data", str(data)])


def test_planted_resume_state_is_refused_and_runs_nothing(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    out, marker = tmp_path / "run.pt", tmp_path / "marker"
    torch.save({"model": Planted(marker)}, tmp_path / "run.pt.state")
    assert train.main(["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "4",
                       "--out", str(out), "--resume"]) == 1
    error = one_line_error(capsys, "train.py")
    assert f"refused to load {out}.state" in error and "nothing from it was executed" in error
    assert not marker.exists()


def test_resume_with_other_settings_is_a_usage_error(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    out = tmp_path / "run.pt"
    common = ["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "4", "--out", str(out)]
    assert train.main(common + ["--batch-size", "3", "--lr", "1e-3", "--stop-after", "2", "--save-every", "1"]) == 0
    before = (tmp_path / "run.pt.state").read_bytes()
    capsys.readouterr()
    assert train.main(common + ["--batch-size", "2", "--lr", "1e-3", "--seed", "1", "--method", "ump",
                                "--sparsity", "0.5", "--resume"]) == 2
    error = one_line_error(capsys, "train.py")
    for expected in ("--method: stored 'dense', given 'ump'", "--sparsity: stored 0.0, given 0.5",
                     "--batch-size: stored 3, given 2", "--seed: stored 0, given 1"):
        assert expected in error
    assert train.main(common + ["--batch-size", "3", "--lr", "2e-3", "--resume"]) == 2     # was silently ignored
    assert "--lr: stored 0.001, given 0.002" in one_line_error(capsys, "train.py")
    assert (tmp_path / "run.pt.state").read_bytes() == before


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    data = noise_corpus(tmp_path / "corpus")
    out = tmp_path / "run.pt"
    common = ["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "4", "--batch-size", "3",
              "--save-every", "1", "--out", str(out)]
    assert train.main(common + ["--stop-after", "2"]) == 0
    state = tmp_path / "run.pt.state"
    before = state.read_bytes()
    capsys.readouterr()

    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        assert train.main(common + ["--resume"]) == 1
    error = one_line_error(capsys, "train.py")
    assert f"cannot write {state}: no space left on device" in error
    assert state.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # evaluate.py --json is written atomically too: a full disk leaves the old report whole
    good, report = tmp_path / "good.pt", tmp_path / "report.json"
    spg.save(tiny_model(), good)
    report.write_text('{"old": true}')
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        assert evaluate.main(["--model", str(good), "--data", str(data), "--json", str(report)]) == 1
    assert f"cannot write {report}: no space left on device" in one_line_error(capsys, "evaluate.py")
    assert json.loads(report.read_text()) == {"old": True}


def test_diverging_weights_stop_train_py_with_one_line(tmp_path, capsys, monkeypatch):
    data = noise_corpus(tmp_path / "corpus")
    out = tmp_path / "run.pt"
    monkeypatch.setattr(spg.experiment, "build_method", lambda args, model: NanWeightAfterStepThree())
    assert train.main(["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "5",
                       "--batch-size", "3", "--save-every", "2", "--out", str(out)]) == 1
    error = one_line_error(capsys, "train.py")
    assert "step 2: the weights are no longer finite" in error and f"{out}.state at step 2" in error
    assert not out.exists() and torch.load(f"{out}.state", weights_only=True)["step"] == 2


def test_stale_temporary_files_of_this_run_are_removed(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    out = tmp_path / "run.pt"
    ours = [tmp_path / ".run.pt.k2j3h4g5.tmp", tmp_path / ".run.pt.state.a_b1c2d3.tmp",
            tmp_path / ".summary.json.zz99yy88.tmp"]
    others = [tmp_path / ".other.pt.k2j3h4g5.tmp", tmp_path / ".run.pt.k2j3h4g5.tmp.keep",
              tmp_path / "run.pt.k2j3h4g5.tmp", tmp_path / ".run.pt.state.x.y.tmp"]
    for index, path in enumerate(ours + others):
        path.write_bytes(b"x" * (1000 * (index + 1)))
    assert train.main(["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "1",
                       "--batch-size", "3", "--out", str(out), "--json", str(tmp_path / "summary.json")]) == 0
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in others)
    assert f"removed 3 stale temporary files of interrupted saves beside {out} (6,000 bytes freed)" \
        in capsys.readouterr().out


def test_too_short_or_too_long_audio_is_refused_by_name_before_the_model_runs(tmp_path, capsys):
    data = noise_corpus(tmp_path / "corpus")
    write_corpus(data, "train", {"0100": ("A CAT", 0.01)}, chapter="199")     # 160 samples < 400 (tiny preset)
    assert train.main(["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "1",
                       "--out", str(tmp_path / "run.pt")]) == 1
    error = one_line_error(capsys, "train.py")
    assert str(data / "train") in error and "19-199-0100.flac (0.0100 s)" in error and "receptive field" in error

    good = tmp_path / "good.pt"
    spg.save(tiny_model(), good)
    assert evaluate.main(["--model", str(good), "--data", str(data), "--max-seconds", "0.5"]) == 1
    error = one_line_error(capsys, "evaluate.py")
    assert "longer than --max-seconds=0.5" in error and "19-198-0005.flac (0.6 s)" in error
    assert evaluate.main(["--model", str(good), "--data", str(data), "--max-seconds", "0.6"]) == 0
