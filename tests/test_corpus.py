"""Tests for spg.audio (resampling, FLAC writing) and spg.corpus (the synthetic corpus)."""

import ctypes
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from spg import audio, corpus

TINY = dict(num_train=6, num_dev=2, num_test=2, num_test_unseen=2, seed=0, progress=False)
TRANSCRIPT_CHARACTERS = re.compile(r"[A-Z']+( [A-Z']+)*")


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------
def _sine(frequency: float, sample_rate: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(int(sample_rate * seconds)) / sample_rate).astype(np.float32)


def _direct_resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """The resampling formula evaluated literally, one output sample at a time (slow)."""
    divisor = math.gcd(orig_sr, new_sr)
    up, down = new_sr // divisor, orig_sr // divisor
    cutoff = audio.ROLLOFF * 0.5 * min(1.0, up / down)
    half_width = audio.ZERO_CROSSINGS / (2 * cutoff)
    inputs = np.arange(len(x))
    out = np.zeros(audio.resampled_length(len(x), orig_sr, new_sr))
    for n in range(len(out)):
        tau = n * down / up - inputs
        window = audio._kaiser_window(tau / half_width, audio.KAISER_BETA)
        out[n] = np.dot(2 * cutoff * np.sinc(2 * cutoff * tau) * window, x)
    return out


@pytest.mark.parametrize("frequency", [440.0, 3000.0])
def test_resample_keeps_frequency_and_amplitude(frequency):
    resampled = audio.resample(_sine(frequency, 22050), 22050, 16000)
    assert resampled.dtype == np.float32
    steady = resampled[1000:-1000].astype(np.float64)  # away from the zero-padded edges
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
    peak = np.argmax(spectrum)
    # Refine the peak bin with a parabola through its neighbours.
    left, centre, right = np.log(spectrum[peak - 1 : peak + 2])
    peak_bin = peak + 0.5 * (left - right) / (left - 2 * centre + right)
    assert peak_bin * 16000 / len(steady) == pytest.approx(frequency, rel=1e-3)
    amplitude = np.sqrt(2 * np.mean(steady**2))
    assert amplitude == pytest.approx(1.0, abs=0.01)
    # And sample by sample: the output is the same sine sampled at 16 kHz.
    expected = _sine(frequency, 16000, len(resampled) / 16000)[1000:-1000]
    assert np.max(np.abs(steady - expected)) < 0.01


def test_resample_removes_what_would_alias():
    resampled = audio.resample(_sine(9000.0, 22050), 22050, 16000)  # above the new Nyquist
    assert np.sqrt(2 * np.mean(resampled[1000:-1000] ** 2)) < 1e-3  # at least 60 dB down


@pytest.mark.parametrize("orig_sr,new_sr", [(22050, 16000), (8000, 16000), (48000, 16000), (44100, 16000), (7, 5)])
def test_resample_matches_the_direct_formula(orig_sr, new_sr):
    x = np.random.default_rng(0).standard_normal(600).astype(np.float32)
    np.testing.assert_allclose(audio.resample(x, orig_sr, new_sr), _direct_resample(x, orig_sr, new_sr), atol=1e-5)


def test_resample_length_and_identity():
    for length in [0, 1, 440, 441, 442, 22050, 22051]:
        expected = math.ceil(length * 16000 / 22050)
        assert audio.resampled_length(length, 22050, 16000) == expected
        assert len(audio.resample(np.zeros(length, np.float32), 22050, 16000)) == expected
    assert len(audio.resample(np.zeros(1001, np.float32), 8000, 16000)) == 2002
    x = np.random.default_rng(1).uniform(-1, 1, 1234).astype(np.float32)
    same = audio.resample(x, 16000, 16000)
    assert same.dtype == np.float32 and np.array_equal(same, x) and same is not x


def test_write_flac_roundtrip(tmp_path):
    x = np.random.default_rng(2).uniform(-1, 1, 3000).astype(np.float32)
    path = tmp_path / "a.flac"
    audio.write_flac(path, x, 16000)
    read, sample_rate = soundfile.read(path, dtype="int16")
    assert sample_rate == 16000 and soundfile.info(path).subtype == "PCM_16"
    assert np.array_equal(read, audio.float_to_pcm16(x))
    assert [p.name for p in tmp_path.iterdir()] == ["a.flac"]  # no temporary file left


# --------------------------------------------------------------------------------------
# Sentences, voices and plans (no audio)
# --------------------------------------------------------------------------------------
def test_word_list():
    words = corpus.vocabulary()
    assert len(words) >= 500
    assert all(re.fullmatch(r"[A-Z']+", word) for word in words)


def test_sentences_are_well_formed():
    rng = np.random.default_rng(0)
    for _ in range(500):
        transcript, spoken = corpus.random_sentence(rng)
        assert TRANSCRIPT_CHARACTERS.fullmatch(transcript)
        assert corpus.MIN_WORDS <= len(transcript.split()) <= corpus.MAX_WORDS
        assert re.sub(r"[,.?]", "", spoken).upper() == transcript


def test_held_out_sentences_never_in_train():
    counts = {"train": 20000, "dev": 1000, "test": 1000, "test-unseen": 500}
    planned = corpus.plan_corpus(counts, seed=3)
    by_split = {split: [u.transcript for u in planned if u.split == split] for split in corpus.SPLITS}
    assert {split: len(texts) for split, texts in by_split.items()} == counts
    all_transcripts = [t for texts in by_split.values() for t in texts]
    assert len(set(all_transcripts)) == len(all_transcripts)  # unique within and across splits
    # Held-out splits do not depend on how much training data is asked for.
    smaller = corpus.plan_corpus({**counts, "train": 10}, seed=3)
    assert [u for u in smaller if u.split != "train"] == [u for u in planned if u.split != "train"]


def test_voices():
    assert not set(corpus.SEEN_VOICES) & set(corpus.HELD_OUT_VOICES)
    planned = corpus.plan_corpus({"train": 300, "dev": 60, "test": 60, "test-unseen": 30}, seed=0)
    for utterance in planned:
        expected = corpus.HELD_OUT_VOICES if utterance.split == "test-unseen" else corpus.SEEN_VOICES
        assert utterance.voice in expected and corpus.VOICES[utterance.speaker_id] == utterance.voice
        assert corpus.RATE_WPM_RANGE[0] <= utterance.rate_wpm <= corpus.RATE_WPM_RANGE[1]
        assert corpus.PITCH_RANGE[0] <= utterance.pitch <= corpus.PITCH_RANGE[1]
    train_voices = [u.voice for u in planned if u.split == "train"]
    assert set(train_voices) == set(corpus.SEEN_VOICES)  # balanced: every seen voice is used
    # eSpeak silently ignores unknown variants: check each exists and changes the audio.
    variants_folder = corpus._synthesizer().data_path / "voices" / "!v"
    for variant in corpus.SEEN_VARIANTS + corpus.HELD_OUT_VARIANTS:
        assert (variants_folder / variant).is_file(), variant
    fingerprints = set()
    for voice in corpus.VOICES:
        waveform = corpus.synthesize("The old baker carried a basket.", voice)
        assert waveform.dtype == np.float32 and 0.5 < len(waveform) / corpus.SAMPLE_RATE < 5
        assert 0.05 < np.max(np.abs(waveform)) <= 1.0
        fingerprints.add(hashlib.sha256(waveform.tobytes()).hexdigest())
    assert len(fingerprints) == len(corpus.VOICES)


def test_unknown_voice_is_an_error():
    with pytest.raises(RuntimeError):
        corpus.synthesize("Hello.", "xx-nonexistent")


def test_synthesis_does_not_depend_on_history():
    first = corpus.synthesize("Where did George push the sacks?", "en+m1", 150, 40)
    corpus.synthesize("Something else entirely.", "en-us+f2", 200, 70)
    assert np.array_equal(first, corpus.synthesize("Where did George push the sacks?", "en+m1", 150, 40))


# --------------------------------------------------------------------------------------
# The corpus on disk
# --------------------------------------------------------------------------------------
def _read_tree(root: Path) -> dict[str, object]:
    """Every file under root: transcripts as text, flacs as (int16 samples, sample rate)."""
    contents: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.suffix == ".flac":
            samples, sample_rate = soundfile.read(path, dtype="int16")
            contents[name] = (samples, sample_rate)
        elif path.is_file() and path.name != "manifest.json":
            contents[name] = path.read_text()
    return contents


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return corpus.build_corpus(tmp_path_factory.mktemp("corpus") / "a", **TINY, num_workers=1)


def test_layout(tiny_corpus):
    manifest = corpus._read_manifest(tiny_corpus)
    assert manifest["splits"]["train"]["utterances"] == 6
    counted = 0
    for split in corpus.SPLITS:
        transcripts = sorted((tiny_corpus / split).glob("*/*/*.trans.txt"))
        assert transcripts, split
        for transcript_file in transcripts:
            speaker, chapter = transcript_file.parent.parts[-2:]
            assert transcript_file.name == f"{speaker}-{chapter}.trans.txt"
            assert int(chapter) == corpus.CHAPTER_ID[split]
            voices = corpus.HELD_OUT_VOICES if split == "test-unseen" else corpus.SEEN_VOICES
            assert corpus.VOICES[int(speaker)] in voices
            lines = transcript_file.read_text().splitlines()
            flacs = sorted(transcript_file.parent.glob("*.flac"))
            assert len(flacs) == len(lines)
            for line in lines:
                utterance_id, text = line.split(" ", 1)
                assert re.fullmatch(rf"{speaker}-{chapter}-\d{{4}}", utterance_id)
                assert TRANSCRIPT_CHARACTERS.fullmatch(text)
                info = soundfile.info(transcript_file.parent / f"{utterance_id}.flac")
                assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
                assert 0.5 < info.duration < 8
                counted += 1
    assert counted == 12
    assert not [p for p in tiny_corpus.parent.iterdir() if p.name != "a"]  # no temporary folder left


def test_generation_is_deterministic_and_reused(tiny_corpus, tmp_path):
    again = corpus.build_corpus(tmp_path / "b", **TINY, num_workers=2)  # other folder, 2 workers
    first, second = _read_tree(tiny_corpus), _read_tree(again)
    assert first.keys() == second.keys()
    for name, value in first.items():
        if isinstance(value, tuple):
            assert np.array_equal(value[0], second[name][0]) and value[1] == second[name][1], name
        else:
            assert value == second[name], name
    # A second call with the same settings reuses the corpus; other settings are refused.
    modified = {path: path.stat().st_mtime_ns for path in again.rglob("*")}
    assert corpus.build_corpus(tmp_path / "b", **TINY) == tmp_path / "b"
    assert modified == {path: path.stat().st_mtime_ns for path in again.rglob("*")}
    with pytest.raises(FileExistsError):
        corpus.build_corpus(tmp_path / "b", **{**TINY, "seed": 1})


def test_default_root_follows_settings(monkeypatch, tmp_path):
    settings = corpus.corpus_settings({"train": 1, "dev": 1, "test": 1, "test-unseen": 1}, seed=0)
    monkeypatch.setenv("SPG_DATA", str(tmp_path))
    root = corpus.default_root(settings)
    assert root.parent == tmp_path and root.name.startswith("synth-")
    assert corpus.default_root({**settings, "seed": 1}) != root


# --------------------------------------------------------------------------------------
# Reproducibility across processes (issue 13, item 6) and leftovers (item 14)
# --------------------------------------------------------------------------------------
NOISE_VOICES = ("en-us+f2", "en+sandro", "en-us+caleb")  # breath noise (f2, sandro), klatt 6 (caleb)
SMALL = dict(num_train=12, num_dev=2, num_test=2, num_test_unseen=2, seed=0, progress=False)


def _perturb_random_state(seed: int) -> None:
    """What a process that initialised eSpeak at another second, or in which other code
    called the C library's rand(), has: other random states in the parent."""
    corpus._synthesizer().library.espeak_ng_SetRandSeed(seed)
    ctypes.CDLL(None).srand(seed + 1)


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_noise_voices_do_not_depend_on_history_or_random_state():
    text = "The old baker carried a basket across the bridge."
    _perturb_random_state(4321)
    first = {voice: corpus.synthesize(text, voice, 170, 50) for voice in NOISE_VOICES}
    corpus.synthesize("Something else entirely.", "en-gb-x-rp+m3", 200, 70)
    _perturb_random_state(98765)
    for voice in reversed(NOISE_VOICES):  # after other voices, in another order
        assert np.array_equal(corpus.synthesize(text, voice, 170, 50), first[voice]), voice
    # A fresh interpreter (eSpeak initialised at another time) that speaks it first.
    script = ("import hashlib, sys; from spg import corpus; "
              "print(' '.join(hashlib.sha256(corpus.synthesize(sys.argv[1], v, 170, 50).tobytes()).hexdigest() "
              "for v in sys.argv[2:]))")
    time.sleep(1.0)  # time(NULL), the seed eSpeak uses, has moved on
    fresh = subprocess.run([sys.executable, "-c", script, text, *NOISE_VOICES], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert fresh == [hashlib.sha256(first[voice].tobytes()).hexdigest() for voice in NOISE_VOICES]
    assert len(set(fresh)) == 3


def test_corpus_is_bit_identical_across_processes(tmp_path):
    planned = corpus.plan_corpus({"train": 12, "dev": 2, "test": 2, "test-unseen": 2}, seed=0)
    variants = {u.voice.split("+")[1] for u in planned}
    assert {"f2", "sandro", "caleb"} <= variants  # the voices that used to differ are covered
    _perturb_random_state(2024)
    here = corpus.build_corpus(tmp_path / "here", **SMALL, num_workers=2)
    script = ("import sys; from spg import corpus; "
              "corpus.build_corpus(sys.argv[1], num_train=12, num_dev=2, num_test=2, num_test_unseen=2, "
              "seed=0, progress=False, num_workers=1)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "fresh")], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
    first, second = _file_hashes(here), _file_hashes(tmp_path / "fresh")
    assert len([name for name in first if name.endswith(".flac")]) == 18
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_corpus_settings_name_the_synthesis_version():
    settings = corpus.corpus_settings({"train": 1, "dev": 1, "test": 1, "test-unseen": 1}, seed=0)
    assert settings["format_version"] == 2  # bumped when per-utterance seeding changed the audio
    assert corpus.utterance_seed("HI", "en-us+f2", 170, 50) == corpus.utterance_seed("HI", "en-us+f2", 170, 50)
    assert corpus.utterance_seed("HI", "en-us+f2", 170, 50) != corpus.utterance_seed("HI", "en-us+f2", 171, 50)
    assert 0 <= corpus.utterance_seed("HI", "en-us+f2", 170, 50) < 2**31


def _fake_build(parent: Path, name: str, *, owner: dict | None, age_seconds: float = 0.0) -> Path:
    folder = parent / name
    (folder / "train").mkdir(parents=True)
    if owner is not None:
        (folder / corpus._BUILDER_FILE).write_text(json.dumps(owner))
    stamp = time.time() - age_seconds
    os.utime(folder, (stamp, stamp))
    return folder


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_build_folders_are_removed(tmp_path):
    host, now = socket.gethostname(), time.time()
    dead = _fake_build(tmp_path, ".synth-a.building-1", owner={"host": host, "pid": _dead_pid(), "started": now})
    live = _fake_build(tmp_path, ".synth-a.building-2", owner={"host": host, "pid": os.getpid(), "started": now})
    elsewhere = _fake_build(tmp_path, ".synth-b.building-3", owner={"host": host + "-other", "pid": 1, "started": now})
    old = _fake_build(tmp_path, ".synth-b.building-4",
                      owner={"host": host, "pid": os.getpid(), "started": now - 25 * 3600})
    legacy_old = _fake_build(tmp_path, ".synth-c.building-5", owner=None, age_seconds=2 * 3600)
    legacy_new = _fake_build(tmp_path, ".synth-c.building-6", owner=None, age_seconds=60)
    unrelated = _fake_build(tmp_path, "synth-d.building-7", owner=None, age_seconds=10 * 24 * 3600)
    assert sorted(corpus.remove_stale_builds(tmp_path)) == sorted([dead, old, legacy_old])
    assert sorted(p for p in tmp_path.iterdir()) == sorted([live, elsewhere, legacy_new, unrelated])


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times are read from Linux's /proc")
def test_a_reused_pid_does_not_keep_a_dead_build(tmp_path):
    """The builder is named by PID and start time: a live process that got the dead builder's
    PID later (it started at another time) does not make its folder look alive."""
    host, now, pid = socket.gethostname(), time.time(), os.getpid()
    ticks = corpus._process_start_ticks(pid)
    assert isinstance(ticks, int) and ticks > 0
    ours = _fake_build(tmp_path, ".synth-a.building-1", owner={"host": host, "pid": pid, "start_ticks": ticks,
                                                                "started": now})
    reused = _fake_build(tmp_path, ".synth-a.building-2", owner={"host": host, "pid": pid, "start_ticks": ticks - 1,
                                                                  "started": now})
    assert corpus.remove_stale_builds(tmp_path) == [reused]
    assert list(tmp_path.iterdir()) == [ours]


def test_killed_build_is_cleaned_up_by_the_next(tmp_path):
    root = tmp_path / "corpus"
    script = ("import sys; from spg import corpus; corpus.build_corpus(sys.argv[1], num_train=400, num_dev=0, "
              "num_test=0, num_test_unseen=0, progress=False, num_workers=1)")
    process = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=Path(__file__).resolve().parent.parent)
    deadline = time.time() + 60
    leftovers = []
    while time.time() < deadline and not any(p.glob("train/*/*/*.flac") for p in leftovers):
        time.sleep(0.05)
        leftovers = list(tmp_path.glob(".corpus.building-*"))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(leftovers) == 1 and (leftovers[0] / corpus._BUILDER_FILE).is_file()
    assert not root.exists()
    owner = json.loads((leftovers[0] / corpus._BUILDER_FILE).read_text())
    assert owner["pid"] == process.pid
    built = corpus.build_corpus(root, num_train=1, num_dev=0, num_test=0, num_test_unseen=0, progress=False)
    assert sorted(tmp_path.iterdir()) == [built], (
        f"builder {owner}; now: alive {corpus._pid_alive(owner['pid'])}, start ticks "
        f"{corpus._process_start_ticks(owner['pid'])}")
    assert not (built / corpus._BUILDER_FILE).exists()


def test_first_build_says_what_it_does(tmp_path, capsys):
    """The first use prints one line before synthesising: what, how big, about how long."""
    root = corpus.build_corpus(tmp_path / "synth", num_train=2, num_dev=1, num_test=1, num_test_unseen=1,
                               progress=True, num_workers=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("synthesising the built-in")]
    assert lines == [f"synthesising the built-in speech corpus once (espeak-ng): 5 utterances, about 0.0 h of "
                     f"audio and 0 MB in {root}; about 0 s with 1 process(es); later runs reuse it"]
    corpus.build_corpus(root, num_train=2, num_dev=1, num_test=1, num_test_unseen=1, progress=True)  # reused
    assert "synthesising the built-in" not in capsys.readouterr().err
