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


# --- issue 24, round 2 ------------------------------------------------------------------------

def saved_tiny_model(path: Path) -> Path:
    spg.save(tiny_model(), path)
    return path


def test_stale_dense_decodings_are_not_reused(tmp_path, capsys):
    """Item 6: the --dense-eval cache is keyed on the transcripts and the audio contents too:
    an edited transcript, or audio replaced with the same size and modification time, decodes
    again, so that MAPSSWE never mixes old hypotheses with new references."""
    data = noise_corpus(tmp_path / "corpus")
    model, cache = saved_tiny_model(tmp_path / "start.pt"), tmp_path / "dense.json"
    common = ["--model", str(model), "--data", str(data), "--test-split", "test", "--sparsity", "0.5",
              "--method", "ump", "--steps", "1", "--batch-size", "3", "--dense-eval", str(cache),
              "--out", str(tmp_path / "run.pt")]
    assert train.main(common) == 0 and train.main(common) == 0
    assert "dense decoding reused" in capsys.readouterr().out

    transcripts = data / "dev" / "19" / "198" / "19-198.trans.txt"
    transcripts.write_text(transcripts.read_text().replace("19-198-0000 HELLO WORLD", "19-198-0000 HELLO THERE"))
    assert train.main(common) == 0
    printed = capsys.readouterr().out
    assert "decoding again" in printed and "reused" not in printed
    assert "HELLO THERE" in json.loads(cache.read_text())["results"]["dev"]["references"]

    import soundfile
    audio = data / "test" / "19" / "198" / "19-198-0001.flac"
    before = os.stat(audio)
    samples, rate = soundfile.read(audio, dtype="int16")
    soundfile.write(audio, -samples, rate, subtype="PCM_16")
    os.utime(audio, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(audio).st_size, os.stat(audio).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert train.main(common) == 0
    printed = capsys.readouterr().out
    assert "decoding again" in printed and "reused" not in printed


@pytest.mark.parametrize("content, shape", [(b"\x00\x01 not json", "not a JSON file"), (b"[1, 2]", "a JSON list"),
                                            (b'{"weights": 1}', "a JSON dict with keys ['weights']")])
def test_a_dense_eval_file_that_is_not_a_cache_is_refused_and_kept(tmp_path, capsys, content, shape):
    """Item 11: --dense-eval naming a file that is not our cache is a usage error naming it,
    before any work; the file is never overwritten."""
    model, cache = saved_tiny_model(tmp_path / "start.pt"), tmp_path / "notes.json"
    cache.write_bytes(content)
    assert train.main(["--model", str(model), "--data", str(noise_corpus(tmp_path / "corpus")), "--test-split", "test",
                       "--steps", "1", "--dense-eval", str(cache), "--out", str(tmp_path / "run.pt")]) == 2
    error = one_line_error(capsys, "train.py")
    assert f"--dense-eval {cache}: {shape}" in error and "expected a dense-decoding cache" in error
    assert cache.read_bytes() == content


def test_outputs_that_would_clobber_inputs_or_each_other_are_usage_errors(tmp_path, capsys):
    """Item 7: before any work (the corpus named here does not exist), exit 2 naming both
    options when two of them name the same file (also through a symlink or a hard link), when
    an output is an existing folder and when an output's folder cannot be created."""
    model = saved_tiny_model(tmp_path / "model.pt")
    original = model.read_bytes()
    (tmp_path / "link.pt").symlink_to(model)
    os.link(model, tmp_path / "hard.pt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    spg_run = saved_tiny_model(tmp_path / "spg.pt")
    common = ["--model", str(model), "--data", str(tmp_path / "no-corpus"), "--steps", "1"]
    for options, expected in [
        (["--out", str(model)], "--out and --model name the same file"),
        (["--out", str(tmp_path / "link.pt")], "--out and --model name the same file"),
        (["--out", str(tmp_path / "x.pt"), "--json", str(tmp_path / "x.pt")], "--out and --json name the same file"),
        (["--out", str(tmp_path / "x.pt"), "--json", str(tmp_path / "hard.pt")], "--json and --model name the same file"),
        (["--out", str(tmp_path / "x.pt"), "--json", str(tmp_path / "x.pt.state")],
         "--out's resume state and --json name the same file"),
        (["--out", str(tmp_path / "x.pt"), "--dense-eval", str(model)], "--dense-eval and --model name the same file"),
        (["--out", str(tmp_path / "x.pt"), "--feature-cache", str(tmp_path / "x.pt")],
         "--out and --feature-cache name the same file"),
        (["--out", str(spg_run), "--method", "mixed", "--sparsity", "0.5", "--mixed-from", str(spg_run)],
         "--out and --mixed-from name the same file"),
        (["--out", str(tmp_path / "folder")], f"--out {tmp_path / 'folder'} is an existing folder; expected a file"),
        (["--out", str(tmp_path / "x.pt"), "--json", str(tmp_path / "folder")], "--json " + str(tmp_path / "folder")
         + " is an existing folder"),
        (["--out", str(tmp_path / "a-file" / "sub" / "x.pt")],
         f"its folder cannot be created ({tmp_path / 'a-file'} is a file)"),
        (["--out", str(tmp_path / "x.pt"), "--feature-cache", str(tmp_path / "a-file")],
         "--feature-cache " + str(tmp_path / "a-file") + " is an existing file; expected a folder"),
    ]:
        assert train.main(common + options) == 2, options
        assert expected in one_line_error(capsys, "train.py"), options
    assert model.read_bytes() == original and not (tmp_path / "x.pt").exists()

    for options, expected in [(["--json", str(model)], "--json and --model name the same file"),
                              (["--json", str(tmp_path / "link.pt")], "--json and --model name the same file"),
                              (["--compare", str(spg_run), "--json", str(spg_run)], "--json and --compare name"),
                              (["--json", str(tmp_path / "folder")], "is an existing folder")]:
        assert evaluate.main(["--model", str(model), "--data", str(tmp_path / "no-corpus"), *options]) == 2, options
        assert expected in one_line_error(capsys, "evaluate.py"), options
    assert model.read_bytes() == original


HOLD_LOCK = """
import sys
from pathlib import Path
from spg.experiment import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), wait=False):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_the_same_out_is_refused_and_leaves_the_first_ones_files(tmp_path, capsys):
    """Item 10: another process holds <out>.lock (as a running train.py does): a run on the same
    --out exits 2 naming the lock and removes none of the live temporary files; once the lock is
    released the next run goes ahead (and removes them as stale)."""
    import subprocess
    data = noise_corpus(tmp_path / "corpus")
    out = tmp_path / "run.pt"
    live = tmp_path / ".run.pt.state.abc123XY.tmp"
    live.write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run.pt.lock")], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        common = ["--init", "tiny", "--data", str(data), "--test-split", "test", "--steps", "1", "--batch-size", "3",
                  "--out", str(out)]
        assert train.main(common) == 2
        error = one_line_error(capsys, "train.py")
        assert f"{out}.lock is held by another run writing --out {out}" in error
        assert live.exists() and not out.exists()
    finally:
        holder.communicate("", timeout=60)
    assert train.main(common) == 0
    assert out.exists() and not live.exists() and not (tmp_path / "run.pt.lock").exists()


def test_a_failing_real_write_names_the_file_and_keeps_the_old_state(tmp_path):
    """Item 11: a real write failure (the file-size limit of `ulimit -f`: torch.save raises a
    RuntimeError) is one line naming the file, exit 1; the previous state stays intact."""
    import resource
    import subprocess
    data = noise_corpus(tmp_path / "corpus")
    model, out = saved_tiny_model(tmp_path / "start.pt"), tmp_path / "run.pt"
    common = ["--model", str(model), "--data", str(data), "--test-split", "test", "--steps", "4",
              "--batch-size", "3", "--save-every", "1", "--out", str(out)]
    assert train.main(common + ["--stop-after", "2"]) == 0
    state = tmp_path / "run.pt.state"
    before = state.read_bytes()
    limit = (model.stat().st_size + len(before)) // 2        # the model's files fit, the state does not
    assert model.stat().st_size < limit < len(before)
    finished = subprocess.run([sys.executable, "train.py", *common, "--resume"], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = [line for line in re.split(r"[\r\n]", finished.stderr) if "error" in line.lower()]
    assert finished.returncode == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert lines == [f"train.py: error: cannot write {state}: File too large"], finished.stderr
    assert state.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """Item 11: SIGINT during training: "train.py: interrupted; resume with --resume (...)" and
    exit 130, no traceback; the state it names resumes."""
    import signal
    import subprocess
    import time
    data = noise_corpus(tmp_path / "corpus")
    model, out = saved_tiny_model(tmp_path / "start.pt"), tmp_path / "run.pt"
    state = tmp_path / "run.pt.state"
    common = ["--model", str(model), "--data", str(data), "--test-split", "test", "--steps", "100000",
              "--batch-size", "3", "--save-every", "1", "--out", str(out)]
    running = subprocess.Popen([sys.executable, "train.py", *common], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not state.exists() and time.time() < deadline and running.poll() is None:
            time.sleep(0.2)
        assert state.exists(), "no state was written"
        time.sleep(1.0)
        running.send_signal(signal.SIGINT)
        _, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 130 and "Traceback" not in err, err
    last = [line for line in re.split(r"[\r\n]", err) if line.strip()][-1]
    assert last == f"train.py: interrupted; resume with --resume (the last saved state is {state})", err
    assert train.main(common + ["--resume", "--stop-after", "1"]) == 0


def test_ctrl_c_in_evaluate_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    data = noise_corpus(tmp_path / "corpus")
    model = saved_tiny_model(tmp_path / "start.pt")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "describe", interrupted)
    assert evaluate.main(["--model", str(model), "--data", str(data)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "evaluate.py: interrupted"
