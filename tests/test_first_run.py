"""A first run that explains itself: the one line before the setup work that precedes the first
step, the list of files a run leaves, and --help with a text and a default for every option."""

import argparse
import re
import sys
from pathlib import Path

import pytest
from helpers import write_corpus

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate  # noqa: E402
import spg  # noqa: E402
import train  # noqa: E402


@pytest.mark.parametrize("script", [train, evaluate], ids=["train.py", "evaluate.py"])
def test_every_option_has_a_help_text_naming_its_default(script):
    parser = script.build_parser()
    assert parser.formatter_class is spg.experiment.HelpFormatter
    assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)   # the docstring as written
    formatter = parser._get_formatter()
    options = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert options
    for action in options:
        assert action.help and action.help.strip(), action.option_strings
        shown = formatter._expand_help(action)
        assert "default" in shown.lower(), (action.option_strings, shown)
        if action.default not in (None, False) and "%(default)" not in action.help and \
                "default" not in action.help.lower():
            assert f"(default: {action.default})" in shown, (action.option_strings, shown)


def test_help_keeps_the_docstring_lines():
    text = train.build_parser().format_help()
    assert "    python train.py --sparsity 0.6                # SPG" in text
    assert "--lr 3e-5 \\\n        --threshold-lr 5e-4" in text          # the continued example stays two lines
    assert "(default: 500)" in text and "(default: off)" in text


def noise_corpus(root: Path) -> Path:
    for split in ("train", "dev", "test"):
        write_corpus(root, split, {f"{i:04d}": (["HELLO WORLD", "A CAT", "NO"][i % 3], 0.3 + 0.05 * i)
                                   for i in range(6)})
    return root


def files_block(printed: str) -> dict[str, str]:
    """{path: the rest of its line} of the "files left by this run:" block."""
    block = printed.split("files left by this run:\n", 1)[1]
    lines = [line for line in block.splitlines() if line.startswith("  ")]
    return {line.split()[0]: line for line in lines}


def test_first_run_says_what_it_does_and_lists_the_files_it_leaves(tmp_path, capsys, monkeypatch):
    from test_training import tiny_model
    monkeypatch.chdir(tmp_path)
    data = noise_corpus(tmp_path / "corpus")
    spg.save(tiny_model(), tmp_path / "dense.pt")
    common = ["--model", "dense.pt", "--data", "corpus", "--test-split", "test", "--sparsity", "0.5",
              "--method", "ump", "--steps", "1", "--batch-size", "3"]
    cached = ["--feature-cache", "cache", "--dense-eval", "dense.json", "--json", "a.json"]
    assert train.main(common + cached + ["--out", "a.pt"]) == 0
    printed = capsys.readouterr().out
    announced = [line for line in printed.splitlines() if line.startswith("before the first step: ")]
    assert len(announced) == 1, printed
    line = announced[0]
    assert "decoding the starting model on dev and test (12 utterances, " in line
    assert "computing the frozen front end's features of 6 training utterances" in line
    assert re.search(r", (about \d+ min|under a minute) on this machine;", line)
    assert "the features are a one-off, cached in cache for later runs on this corpus" in line
    assert "the decoding is a one-off, kept in dense.json" in line
    assert printed.index(line) < printed.index("=== summary ===") < printed.index("files left by this run:")

    files = files_block(printed)
    assert list(files) == ["a.pt", "a.pt.state", "cache/", "dense.json", "a.json"]
    for name in files:
        path = tmp_path / name
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        amount, unit = files[name].split()[1:3]
        assert size > 0 and float(amount) == pytest.approx(size / {"MB": 1e6, "kB": 1e3}[unit], abs=0.051), files[name]
    assert re.search(r"score it with python \S*evaluate\.py --model a\.pt --compare dense\.pt$", files["a.pt"])
    assert "needed only for --resume: rm a.pt.state" in files["a.pt.state"]
    assert "rm -r cache" in files["cache/"] and "rm dense.json" in files["dense.json"]
    assert files["a.json"].endswith("the summary figures (--json)")

    # a second run of the sweep reuses both caches: nothing to announce
    assert train.main(common + cached + ["--out", "b.pt", "--sparsity", "0.6"]) == 0
    printed = capsys.readouterr().out
    assert "before the first step" not in printed and "dense decoding reused from dense.json" in printed

    # without the caches: the features live in memory, the decoding is repeated, and neither is listed
    assert train.main(common + ["--out", "c.pt"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("before the first step: "))
    assert "kept in memory for this run only (--feature-cache FOLDER keeps them)" in line
    assert "the decoding is repeated by every run (--dense-eval FILE keeps it)" in line
    assert list(files_block(printed)) == ["c.pt", "c.pt.state"]
