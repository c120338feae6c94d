"""Careless and hostile corpus input (issue 13, items 7, 8, 11): refused by name or converted
with a warning, never a silent wrong number."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import write_corpus

from spg.data import SAMPLE_RATE, AudioCache, DataError, Utterance, check_durations, read_audio, read_corpus
from spg.whisper.evaluation import evaluate_whisper, read_transcription_folder


# ----------------------------------------------------------------------------------------
# Item 7: float audio louder than full scale
# ----------------------------------------------------------------------------------------

def test_loud_float_audio_is_cached_exactly_and_named(tmp_path):
    # The case: a float WAV at peak 10.7 in a recordings folder (which takes .wav).
    t = np.arange(8000) / SAMPLE_RATE
    soundfile.write(tmp_path / "loud.wav", (10.7 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE,
                    subtype="FLOAT")
    soundfile.write(tmp_path / "quiet.flac", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), SAMPLE_RATE,
                    subtype="PCM_16")
    (tmp_path / "transcription").write_text("<s> loud </s> (loud)\n<s> quiet </s> (quiet)\n")
    utterances = read_transcription_folder(tmp_path)
    uncached = read_audio(utterances[0])
    assert float(np.max(np.abs(uncached))) == pytest.approx(10.7, rel=1e-4)
    cache = AudioCache(utterances)
    with pytest.warns(UserWarning, match=r"loud\.wav: audio louder than full scale \(peak 10\.7 > 1\.0\)"):
        first = cache.waveform(0)
    assert np.array_equal(first, uncached)                 # not clipped to [-1, 1)
    assert np.array_equal(cache.waveform(0), uncached)     # and the same from the cache
    assert cache.louder_than_full_scale == [(tmp_path / "loud.wav", pytest.approx(10.7, rel=1e-4))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # the quiet 16-bit file: no warning
        quiet = cache.waveform(1)
    assert np.array_equal(quiet, read_audio(utterances[1]))
    assert cache._store[1].dtype == np.int16               # still stored in half the memory
    batch = cache.batch([0, 1], normalize=False)
    assert float(batch.waveforms[0].abs().max()) == pytest.approx(10.7, rel=1e-4)


def test_float_audio_within_full_scale_is_cached_exactly(tmp_path):
    folder = tmp_path / "dev" / "1" / "2"
    folder.mkdir(parents=True)
    samples = np.random.default_rng(0).uniform(-0.9, 0.9, 4000).astype(np.float32)  # not 16-bit values
    soundfile.write(folder / "1-2-0000.flac", samples, SAMPLE_RATE, subtype="PCM_24")
    (folder / "1-2.trans.txt").write_text("1-2-0000 HI\n")
    utterances = read_corpus(tmp_path, "dev")
    cache = AudioCache(utterances)
    assert np.array_equal(cache.waveform(0), read_audio(utterances[0]))
    assert np.array_equal(cache.waveform(0), read_audio(utterances[0]))


# ----------------------------------------------------------------------------------------
# Item 8: empty splits, blank transcripts, unlisted audio
# ----------------------------------------------------------------------------------------

def test_empty_split_is_an_error_naming_split_and_folder(tmp_path):
    folder = tmp_path / "test" / "1" / "2"
    folder.mkdir(parents=True)
    (folder / "1-2.trans.txt").write_text("\n\n")
    with pytest.raises(DataError, match=rf"split 'test' has no utterances.*1 transcript file.*{tmp_path / 'test'}"):
        read_corpus(tmp_path, "test")


@pytest.mark.parametrize("line", ["19-198-0001", "19-198-0001   ", "19-198-0001 \t "])
def test_blank_transcript_is_an_error_naming_file_and_line(tmp_path, line):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1), "0001": ("THERE", 0.1)})
    (folder / "19-198.trans.txt").write_text(f"19-198-0000 HI\n{line}\n")
    with pytest.raises(DataError, match=r"19-198\.trans\.txt:2: utterance 19-198-0001 has an empty transcript"):
        read_corpus(tmp_path, "dev")


def test_unlisted_audio_is_reported_with_count_and_names(tmp_path):
    folder = write_corpus(tmp_path, "dev", {f"{i:04d}": ("HI", 0.05) for i in range(8)})
    (folder / "19-198.trans.txt").write_text("19-198-0000 HI\n19-198-0001 HI\n")
    with pytest.warns(UserWarning, match=r"6 audio file\(s\) not listed in any trans\.txt are not used, "
                                         r"e\.g\. 19/198/19-198-0002\.flac, 19/198/19-198-0003\.flac"):
        utterances = read_corpus(tmp_path, "dev")
    assert [u.id for u in utterances] == ["19-198-0000", "19-198-0001"]


def _transcription_folder(folder: Path, lines: list[str], seconds: dict[str, float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, length in seconds.items():
        soundfile.write(folder / f"{name}.flac", np.zeros(int(length * SAMPLE_RATE), np.int16), SAMPLE_RATE)
    (folder / "transcription").write_text("".join(line + "\n" for line in lines))
    return folder


def test_transcription_folder_bad_inputs(tmp_path):
    empty = _transcription_folder(tmp_path / "empty", ["", "  "], {})
    with pytest.raises(DataError, match=rf"{empty}: no utterances in {empty / 'transcription'}"):
        read_transcription_folder(empty)
    blank = _transcription_folder(tmp_path / "blank", ["<s> hello </s> (a)", "<s>  </s> (b)"], {"a": 0.1, "b": 0.1})
    with pytest.raises(DataError, match=r"blank/transcription:2: utterance b has an empty transcript"):
        read_transcription_folder(blank)
    extra = _transcription_folder(tmp_path / "extra", ["<s> hello </s> (a)"], {"a": 0.1, "b": 0.1, "c": 0.1})
    with pytest.warns(UserWarning, match=r"2 audio file\(s\) not listed in .*transcription are not used, "
                                         r"e\.g\. b\.flac, c\.flac"):
        assert [u.id for u in read_transcription_folder(extra)] == ["a"]


# ----------------------------------------------------------------------------------------
# Item 11: too short for the model, too long for memory (or for Whisper's 30 s window)
# ----------------------------------------------------------------------------------------

def _utterance(name: str, num_samples: int) -> Utterance:
    return Utterance(name, Path(f"/corpus/{name}.flac"), "HI", num_samples, SAMPLE_RATE, 1)


def test_check_durations_names_short_and_long_files():
    fine = [_utterance(f"ok{i}", 16000) for i in range(3)]
    check_durations(fine, min_samples=400, max_seconds=60, where="split dev")        # no error
    check_durations([_utterance("edge", 400), _utterance("long", 60 * 16000)], min_samples=400, max_seconds=60,
                    where="split dev")                                                # both limits inclusive
    short = [_utterance("a", 80), _utterance("b", 399)]
    with pytest.raises(DataError) as error:
        check_durations(fine + short, min_samples=400, max_seconds=60, where="split dev of /corpus")
    assert str(error.value) == ("split dev of /corpus: 2 utterance(s) shorter than the model's receptive field of "
                                "400 samples (0.025 s): /corpus/a.flac (0.0050 s), /corpus/b.flac (0.0249 s); "
                                "remove them from the transcript file")
    long = [_utterance(f"long{i}", 600 * 16000 + i) for i in range(7)]
    with pytest.raises(DataError, match=r"^split train: 7 utterance\(s\) longer than --max-seconds=60: "
                                        r"/corpus/long0\.flac \(600\.0 s\), .*/corpus/long4\.flac \(600\.0 s\); "
                                        r"raise --max-seconds or split the file$"):
        check_durations(long + fine, min_samples=400, max_seconds=60, where="split train")
    check_durations(long, min_samples=400, max_seconds=None, where="split train")     # no upper limit
    with pytest.raises(DataError, match=r"1 utterance\(s\) shorter.*; and 1 utterance\(s\) longer"):
        check_durations([short[0], long[0]], min_samples=400, max_seconds=60, where="x")
    with pytest.raises(ValueError, match="max_seconds"):
        check_durations(fine, min_samples=400, max_seconds=0, where="x")


def test_check_durations_on_a_real_short_flac(tmp_path):
    write_corpus(tmp_path, "test", {"0000": ("HELLO", 0.5), "0001": ("HI", 0.005)})
    utterances = read_corpus(tmp_path, "test")
    with pytest.raises(DataError, match=r"test: 1 utterance\(s\) shorter than the model's receptive field of 400 "
                                        r"samples \(0\.025 s\): .*19-198-0001\.flac \(0\.0050 s\)"):
        check_durations(utterances, min_samples=400, max_seconds=60, where=str(tmp_path / "test"))


class _Untouchable:
    """A model that fails the test if anything uses it."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the input was checked")


def test_whisper_refuses_audio_longer_than_its_window(tmp_path):
    folder = _transcription_folder(tmp_path / "rec", ["<s> hello </s> (a)", "<s> long talk </s> (b)"],
                                   {"a": 30.0, "b": 31.5})
    with pytest.raises(DataError, match=r"rec: 1 utterance\(s\) longer than Whisper's 30 s window .*b\.flac \(31\.5 s\)"):
        read_transcription_folder(folder)
    # evaluate_whisper checks utterances from any reader (here read_corpus) before decoding.
    write_corpus(tmp_path / "corpus", "test", {"0000": ("HI", 0.5), "0001": ("A LONG ONE", 30.01)})
    utterances = read_corpus(tmp_path / "corpus", "test")
    with pytest.raises(DataError, match=r"evaluate_whisper: 1 utterance\(s\) longer than Whisper's 30 s window.*"
                                        r"19-198-0001\.flac \(30\.0 s\)"):
        evaluate_whisper(_Untouchable(), utterances)
    with pytest.raises(DataError, match="no utterances"):
        evaluate_whisper(_Untouchable(), [])
