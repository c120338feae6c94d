"""What the command-line front ends (train.py, evaluate.py, through `spg.experiment`) share:
checks of their output paths before any work, and one-line errors with exit codes.

An error a user can cause and fix (a bad file or argument, a full disk, diverged training)
ends the program with one line "PROGRAM: error: ..." and exit code 1, or 2 when the command
line contradicts itself or a file (`UsageError`, a resume with other settings); anything else
is a bug and keeps its traceback (`exit_code_of`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from spg.checkpoint import CheckpointError
from spg.data import DataError
from spg.resume import ResumeMismatchError
from spg.training import NonFiniteWeightsError


class UsageError(ValueError):
    """Options that cannot work together or with the files they name (two options naming the
    same file, an output that is a folder, a --dense-eval file that is not a cache): exit 2."""


def check_output_paths(inputs: dict, outputs: dict, output_folders: Optional[dict] = None) -> None:
    """Before any work, a UsageError naming the options (labels of the dicts, which map a label
    to a path or None) when an output would destroy a file or could not be written: an output
    file (`outputs`) or folder (`output_folders`) that is the same file as another output or
    an existing input (resolved paths compared, and os.path.samefile where both exist, so
    symlinks and hard links count); an output file that is an existing folder, or an output
    folder that is an existing file; an output whose folder cannot be created (a file or an
    unwritable folder on its way)."""
    output_folders = output_folders or {}
    written = {label: Path(path) for label, path in {**outputs, **output_folders}.items() if path is not None}
    existing_inputs = {label: Path(path) for label, path in inputs.items() if path is not None and Path(path).exists()}
    for label, path in written.items():
        folder = label in output_folders
        if path.is_dir() and not folder:
            raise UsageError(f"{label} {path} is an existing folder; expected a file name")
        if path.exists() and folder and not path.is_dir():
            raise UsageError(f"{label} {path} is an existing file; expected a folder")
        blocker = _uncreatable(path if folder else path.parent)
        if blocker:
            raise UsageError(f"{label} {path}: its folder cannot be created ({blocker})")
    others = list(written.items()) + list(existing_inputs.items())
    for index, (label, path) in enumerate(written.items()):
        for other, other_path in others[index + 1:]:
            if path.resolve() == other_path.resolve() or \
                    path.exists() and other_path.exists() and os.path.samefile(path, other_path):
                raise UsageError(f"{label} and {other} name the same file ({path}), which {label} would "
                                 f"overwrite; give {label} another path")


def _uncreatable(folder: Path) -> Optional[str]:
    """Why `folder` cannot be created or written to (its nearest existing ancestor is a file or
    not writable), or None when it can."""
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def failure_message(error: BaseException) -> Optional[tuple[int, str]]:
    """(exit code, one line) for an error a command-line user can cause and fix (a bad file or
    argument, a full disk, diverged training); None for anything else, which is a bug and
    keeps its traceback. Exit code 2: the command line contradicts a file (a resume with
    other settings, a `UsageError`); 1: the rest."""
    if isinstance(error, (ResumeMismatchError, UsageError)):
        return 2, str(error)
    if isinstance(error, (CheckpointError, DataError, NonFiniteWeightsError)):
        return 1, str(error)
    if isinstance(error, OSError):
        if error.errno is not None and error.strerror:
            text = error.strerror
            if error.filename is not None:
                text += f": {error.filename}"
            if getattr(error, "filename2", None) is not None:
                text += f" -> {error.filename2}"
            return 1, text
        return 1, str(error) or type(error).__name__
    return None


def exit_code_of(program: str, run: Callable[[], int]) -> int:
    """`run()`'s exit code; for an expected error (see `failure_message`) one line
    "PROGRAM: error: ..." on stderr and its exit code instead; for Ctrl-C (KeyboardInterrupt)
    one line "PROGRAM: interrupted..." (its message, if any) and 130. Bugs keep their traceback."""
    try:
        return run()
    except KeyboardInterrupt as interrupt:
        print(f"\n{program}: {interrupt.args[0] if interrupt.args else 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:
        failure = failure_message(error)
        if failure is None:
            raise
        code, text = failure
        print(f"{program}: error: {' '.join(text.splitlines())}", file=sys.stderr)
        return code
