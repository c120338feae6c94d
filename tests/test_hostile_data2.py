"""Hostile and broken corpus input, round 2 (issue 24, items 3, 5, 9, 11, 12): each is refused by
name (file, line, id) or read correctly, never a silent wrong number, a hang or a traceback."""

import os
import re
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import write_corpus

import spg.data
from spg import audio
from spg.data import (MAX_SAMPLE_RATE, MAX_TRANSCRIPT_BYTES, MIN_SAMPLE_RATE, SAMPLE_RATE, AudioCache, DataError,
                      check_durations, read_audio, read_corpus)
from spg.whisper.evaluation import is_transcription_folder, read_transcription_folder

TRANS = "19-198.trans.txt"


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) if the block takes longer than `seconds`."""
    def expire(signum, frame):
        raise AssertionError(f"still running after {seconds} s (the reader blocked)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _flac(path: Path, seconds: float, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    """Write seeded noise as a 16-bit FLAC; return what soundfile reads back, (frames, channels)."""
    samples = 0.1 * np.random.default_rng(0).standard_normal((int(seconds * sample_rate), channels))
    soundfile.write(path, samples.astype(np.float32), sample_rate, subtype="PCM_16")
    return soundfile.read(path, dtype="float32", always_2d=True)[0]


def _set_streaminfo_total(path: Path, total: int) -> None:
    """Rewrite STREAMINFO's total samples by hand: after "fLaC" and the 4-byte block header, the
    low 36 bits of data bytes 13..17 (the MD5 that follows is left alone, as a liar would)."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0 and int.from_bytes(data[5:8], "big") == 34
    field = int.from_bytes(data[8 + 13 : 8 + 18], "big")
    data[8 + 13 : 8 + 18] = ((field & ~(2**36 - 1)) | total).to_bytes(5, "big")
    path.write_bytes(bytes(data))


def _sphinx(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "transcription").write_text("".join(line + "\n" for line in lines))
    return folder


# ----------------------------------------------------------------------------------------
# Item 3: transcript ids that leave the corpus
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id, reason", [
    ("../../../outside", "path separator"),
    ("..", "starts with a dot"),
    (".hidden", "starts with a dot"),
    ("a..b", r"contains '\.\.'"),
    ("19-198-0000\x00x", "control or invisible character"),
    ("\u202e19-198-0000", "control or invisible character"),
    ("sub\\outside", "path separator"),
    ("C:outside", "names a drive"),
])
def test_librispeech_ids_that_are_not_plain_stems_are_refused(tmp_path, bad_id, reason):
    root = tmp_path / "corpus"
    folder = write_corpus(root, "dev", {"0000": ("HI", 0.1)})
    _flac(root / "outside.flac", 0.1)             # what ../../../outside would have read
    (folder / ".hidden.flac").write_bytes((folder / "19-198-0000.flac").read_bytes())
    with open(folder / TRANS, "a") as stream:
        stream.write(f"{bad_id} SECRET\n")
    with pytest.raises(DataError) as error:
        read_corpus(root, "dev")
    message = str(error.value)
    assert message.startswith(f"{folder / TRANS}:2: utterance id {bad_id!r} is not a plain file name (")
    assert "\n" not in message and re.search(reason, message)


def test_librispeech_absolute_id_is_refused(tmp_path):
    root = tmp_path / "corpus"
    folder = write_corpus(root, "dev", {"0000": ("HI", 0.1)})
    _flac(tmp_path / "secret.flac", 0.1)
    (folder / TRANS).write_text(f"{tmp_path / 'secret'} HI\n")
    with pytest.raises(DataError, match=rf"{TRANS}:1: utterance id '{tmp_path / 'secret'}' is not a plain file "
                                        r"name \(it contains a path separator, it is an absolute path or names a "
                                        r"drive\)"):
        read_corpus(root, "dev")


def test_sphinx_ids_that_leave_the_folder_are_refused(tmp_path):
    _flac(tmp_path / "secret.flac", 0.1)
    for bad_id in ["../secret", str(tmp_path / "secret"), ".", ""]:
        folder = _sphinx(tmp_path / "rec", ["<s> hello </s> (a)", f"<s> secret </s> ({bad_id})"])
        _flac(folder / "a.flac", 0.1)
        with pytest.raises(DataError, match=rf"^{folder / 'transcription'}:2: utterance id {bad_id!r} is not a "
                                            r"plain file name"):
            read_transcription_folder(folder)


def test_audio_symlinked_out_of_the_corpus_is_refused(tmp_path):
    root = tmp_path / "corpus"
    folder = write_corpus(root, "dev", {"0000": ("HI", 0.1), "0001": ("THERE", 0.1)})
    _flac(tmp_path / "secret.flac", 0.1)
    (folder / "19-198-0001.flac").unlink()
    (folder / "19-198-0001.flac").symlink_to(tmp_path / "secret.flac")
    with pytest.raises(DataError, match=rf"^{folder / TRANS}:2: audio file of 19-198-0001: "
                                        rf"{folder / '19-198-0001.flac'} "
                                        rf"resolves to {tmp_path / 'secret.flac'}, outside the corpus folder "
                                        rf"{root / 'dev'}"):
        read_corpus(root, "dev")
    # A relative symlink climbing out is the same; one that stays inside the split is followed,
    # and the split folder itself may be a symlink (LibriSpeech on another disk).
    (folder / "19-198-0001.flac").unlink()
    (folder / "19-198-0001.flac").symlink_to("../../../../secret.flac")
    with pytest.raises(DataError, match="outside the corpus folder"):
        read_corpus(root, "dev")
    (folder / "19-198-0001.flac").unlink()
    (folder / "19-198-0001.flac").symlink_to("19-198-0000.flac")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "dev").symlink_to(root / "dev")
    assert [u.id for u in read_corpus(tmp_path / "elsewhere", "dev")] == ["19-198-0000", "19-198-0001"]


def test_sphinx_audio_symlinked_out_of_the_folder_is_refused(tmp_path):
    _flac(tmp_path / "secret.flac", 0.1)
    folder = _sphinx(tmp_path / "rec", ["<s> secret </s> (a)"])
    (folder / "a.wav").symlink_to(tmp_path / "secret.flac")
    with pytest.raises(DataError, match=rf"transcription:1: audio file of a: {folder / 'a.wav'} resolves to "
                                        rf"{tmp_path / 'secret.flac'}, outside the corpus folder {folder}"):
        read_transcription_folder(folder)


# ----------------------------------------------------------------------------------------
# Item 5: duplicate utterance ids
# ----------------------------------------------------------------------------------------

def test_duplicate_ids_are_refused_within_a_file_and_across_the_split(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1), "0001": ("THERE", 0.1)})
    (folder / TRANS).write_text("19-198-0000 HI\n19-198-0001 THERE\n19-198-0000 HI\n")
    with pytest.raises(DataError, match=rf"^{folder / TRANS}:3: utterance 19-198-0000 is listed twice in split 'dev' "
                                        rf"\(first at {folder / TRANS}:1\)"):
        read_corpus(tmp_path, "dev")
    # The same id in two chapters' transcripts (each with its own audio file) is also scored twice.
    (folder / TRANS).write_text("19-198-0000 HI\n")
    other = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)}, speaker="20", chapter="7")
    (other / "19-198-0000.flac").write_bytes((folder / "19-198-0000.flac").read_bytes())
    (other / "20-7.trans.txt").write_text("20-7-0000 HI\n19-198-0000 HI\n")
    with pytest.raises(DataError, match=rf"^{other / '20-7.trans.txt'}:2: utterance 19-198-0000 is listed twice .*"
                                        rf"\(first at {folder / TRANS}:1\)"):
        read_corpus(tmp_path, "dev")


def test_sphinx_duplicate_ids_are_refused(tmp_path):
    folder = _sphinx(tmp_path / "rec", ["<s> one </s> (a)", "", "<s> one again </s> (a)"])
    _flac(folder / "a.flac", 0.1)
    with pytest.raises(DataError, match=rf"^{folder / 'transcription'}:3: utterance a is listed twice "
                                        r"\(first on line 1\)"):
        read_transcription_folder(folder)


# ----------------------------------------------------------------------------------------
# Item 9: sample rates, and the resampler's work
# ----------------------------------------------------------------------------------------

def test_the_issues_ten_megahertz_wav_is_refused_at_once(tmp_path):
    folder = _sphinx(tmp_path / "rec", ["<s> hi </s> (fast)"])
    soundfile.write(folder / "fast.wav", np.zeros(1000, np.int16), 9_999_991)
    started = time.perf_counter()
    with pytest.raises(DataError) as error:
        read_transcription_folder(folder)
    assert time.perf_counter() - started < 5
    assert str(error.value) == (f"{folder / 'transcription'}:1: cannot read audio file {folder / 'fast.wav'} of fast: "
                                f"sample rate 9999991 Hz is outside the 8000..384000 Hz these readers take")


@pytest.mark.parametrize("rate, accepted", [(MIN_SAMPLE_RATE - 1, False), (MIN_SAMPLE_RATE, True), (11_127, True),
                                            (44_100, True), (MAX_SAMPLE_RATE, True), (MAX_SAMPLE_RATE + 1, False)])
def test_sample_rate_bounds_in_the_librispeech_reader(tmp_path, rate, accepted):
    folder = tmp_path / "dev" / "1" / "2"
    folder.mkdir(parents=True)
    # WAV data under a .flac name: libsndfile reads by content, and FLAC cannot store 384001 Hz.
    soundfile.write(folder / "1-2-0.flac", np.zeros(rate // 10, np.int16), rate, format="WAV")
    (folder / "1-2.trans.txt").write_text("1-2-0 HI\n")
    if accepted:
        with pytest.warns(UserWarning, match=rf"resampled.*\({rate} Hz\)"):
            utterances = read_corpus(tmp_path, "dev")
        expected = -(-(rate // 10) * SAMPLE_RATE // rate)               # ceil: the same duration at 16 kHz
        assert utterances[0].num_samples == expected and read_audio(utterances[0]).shape == (expected,)
    else:
        with pytest.raises(DataError, match=rf"^{folder / '1-2.trans.txt'}:1: cannot read audio file "
                                            rf"{folder / '1-2-0.flac'} of 1-2-0: sample rate {rate} Hz is outside "
                                            r"the 8000\.\.384000 Hz these readers take$"):
            read_corpus(tmp_path, "dev")


def test_a_rate_the_resampler_refuses_is_refused_by_the_reader(tmp_path):
    # 44 099 Hz is inside the bounds, but 16000/44099 is irreducible: 16 000 phases, 5.8 M weights.
    folder = tmp_path / "dev" / "1" / "2"
    folder.mkdir(parents=True)
    soundfile.write(folder / "1-2-0.flac", np.zeros(4410, np.int16), 44_099)
    (folder / "1-2.trans.txt").write_text("1-2-0 HI\n")
    with pytest.raises(DataError, match=rf"1-2\.trans\.txt:1: cannot read audio file {folder / '1-2-0.flac'} of "
                                        r"1-2-0: resampling 44099 Hz to 16000 Hz would need a 5\.8\d M-weight filter "
                                        r"\(ratio 16000/44099; the limit is 4\.19 M\); convert the file"):
        read_corpus(tmp_path, "dev")


def test_resample_refuses_huge_kernels_before_allocating():
    started = time.perf_counter()
    for orig_sr in (9_999_991, 383_999, 44_099):
        with pytest.raises(ValueError, match=rf"resampling {orig_sr} Hz to 16000 Hz would need"):
            audio.resample(np.zeros(10, np.float32), orig_sr, 16000)
    assert time.perf_counter() - started < 1          # refused from the rates, nothing built
    with pytest.raises(ValueError, match="positive integers"):
        audio.check_resample(0, 16000)
    common = [8000, 11025, 12000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000, 352800, 384000]
    for orig_sr in common:
        audio.check_resample(orig_sr, 16000)
        audio.check_resample(16000, orig_sr)
        assert audio.kernel_weights(orig_sr, 16000) < 400_000


@pytest.mark.parametrize("orig_sr, new_sr", [(22050, 16000), (8000, 16000), (11127, 16000), (8001, 16000),
                                             (384000, 16000), (352800, 16000), (16000, 44100), (30011, 16000)])
def test_kernel_weights_bounds_what_is_built(orig_sr, new_sr):
    frame_outputs, frame_inputs = audio._frames_per_kernel(orig_sr, new_sr)
    _, blocks = audio._kernel_blocks(frame_outputs, frame_inputs)
    built = sum(weights.size for *_, weights in blocks)
    assert built <= audio.kernel_weights(orig_sr, new_sr) <= 2 * built


# ----------------------------------------------------------------------------------------
# Item 11: tracebacks, hangs and huge reads instead of the named error
# ----------------------------------------------------------------------------------------

def test_invalid_utf8_names_file_line_and_column(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1), "0001": ("CAFE", 0.1)})
    (folder / TRANS).write_bytes(b"19-198-0000 HI\r\n19-198-0001 CAF\xe9\n")
    with pytest.raises(DataError) as error:
        read_corpus(tmp_path, "dev")
    assert str(error.value) == (f"{folder / TRANS}:2: not valid UTF-8 (byte 0xe9 at column 16); "
                                f"expected a UTF-8 text file")
    sphinx = _sphinx(tmp_path / "rec", [])
    (sphinx / "transcription").write_bytes(b"<s> hi </s> (a)\n\n<s> \xff\xfe </s> (b)\n")
    with pytest.raises(DataError, match=rf"^{sphinx / 'transcription'}:3: not valid UTF-8 \(byte 0xff at column 5\)"):
        read_transcription_folder(sphinx)


def test_byte_order_mark_and_windows_line_ends_are_read(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1), "0001": ("THERE", 0.1)})
    (folder / TRANS).write_bytes(b"\xef\xbb\xbf19-198-0000 HI\r\n19-198-0001 THERE\r\n")
    assert [(u.id, u.transcript) for u in read_corpus(tmp_path, "dev")] == [("19-198-0000", "HI"),
                                                                          ("19-198-0001", "THERE")]


def test_fifo_as_transcript_is_refused_without_blocking(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    (folder / TRANS).unlink()
    os.mkfifo(folder / TRANS)
    with deadline(20), pytest.raises(DataError) as error:
        read_corpus(tmp_path, "dev")
    assert str(error.value) == (f"cannot read transcript file {folder / TRANS}: it is a FIFO (named pipe), "
                                f"expected a regular file")
    sphinx = tmp_path / "rec"
    sphinx.mkdir()
    os.mkfifo(sphinx / "transcription")
    assert is_transcription_folder(sphinx)           # so evaluate.py reports it, not "no split"
    with deadline(20), pytest.raises(DataError, match=rf"^cannot read transcript file {sphinx / 'transcription'}: "
                                                      r"it is a FIFO"):
        read_transcription_folder(sphinx)


def test_device_or_directory_as_transcript_is_refused(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    (folder / TRANS).unlink()
    (folder / TRANS).symlink_to("/dev/zero")
    with deadline(20), pytest.raises(DataError, match=rf"^transcript file: {folder / TRANS} resolves to /dev/zero, "
                                                      r"outside the corpus folder"):
        read_corpus(tmp_path, "dev")                  # /dev/zero is outside the split: refused for that first
    (folder / TRANS).unlink()
    with deadline(20), pytest.raises(DataError, match=r"^cannot read transcript file /dev/zero: it is a character "
                                                      r"device, expected a regular file$"):
        spg.data.read_transcript_lines(Path("/dev/zero"))   # the kind check itself (used by both readers)
    (folder / TRANS).mkdir()
    with pytest.raises(DataError, match=rf"^cannot read transcript file {folder / TRANS}: it is a directory"):
        read_corpus(tmp_path, "dev")


def test_transcript_size_is_bounded_before_reading(tmp_path, monkeypatch):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    with open(folder / TRANS, "r+b") as stream:     # sparse: 64 MB + 1 byte without writing them
        stream.truncate(MAX_TRANSCRIPT_BYTES + 1)
    with pytest.raises(DataError, match=rf"^transcript file {folder / TRANS} is larger than 64 MB "
                                        rf"\({MAX_TRANSCRIPT_BYTES + 1} bytes\)"):
        read_corpus(tmp_path, "dev")
    # At the limit it is read (shown with a smaller limit, to keep the test small).
    monkeypatch.setattr(spg.data, "MAX_TRANSCRIPT_BYTES", 15)
    (folder / TRANS).write_text("19-198-0000 HI\n")  # 15 bytes
    assert len(read_corpus(tmp_path, "dev")) == 1
    (folder / TRANS).write_text("19-198-0000 HI \n")
    with pytest.raises(DataError, match=r"larger than 0 MB \(16 bytes\)"):
        read_corpus(tmp_path, "dev")


def test_audio_that_is_not_a_regular_file_is_refused(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    (folder / "19-198-0000.flac").unlink()
    os.mkfifo(folder / "19-198-0000.flac")
    with deadline(20), pytest.raises(DataError) as error:
        read_corpus(tmp_path, "dev")
    assert str(error.value) == (f"{folder / TRANS}:1: cannot read audio file {folder / '19-198-0000.flac'} of "
                                f"19-198-0000: it is a FIFO (named pipe), expected a regular file")
    sphinx = _sphinx(tmp_path / "rec", ["<s> hi </s> (a)"])
    (sphinx / "a.wav").mkdir()
    with pytest.raises(DataError, match=r"cannot read audio file .*a\.wav of a: it is a directory"):
        read_transcription_folder(sphinx)


def test_audio_replaced_by_a_fifo_after_indexing_is_refused_when_read(tmp_path):
    folder = write_corpus(tmp_path, "dev", {"0000": ("HI", 0.1)})
    utterances = read_corpus(tmp_path, "dev")
    (folder / "19-198-0000.flac").unlink()
    os.mkfifo(folder / "19-198-0000.flac")
    with deadline(20), pytest.raises(DataError, match=r"^cannot read audio file .*19-198-0000\.flac: it is a FIFO"):
        read_audio(utterances[0])


# ----------------------------------------------------------------------------------------
# Item 12: FLAC STREAMINFO that lies, or says "unknown"
# ----------------------------------------------------------------------------------------

def test_flac_holding_more_than_its_header_says_is_refused_when_read(tmp_path):
    folder = tmp_path / "dev" / "1" / "2"
    folder.mkdir(parents=True)
    _flac(folder / "1-2-0.flac", 20.0)
    _set_streaminfo_total(folder / "1-2-0.flac", SAMPLE_RATE)            # says 1 s, holds 20 s
    (folder / "1-2.trans.txt").write_text("1-2-0 HI\n")
    assert soundfile.read(folder / "1-2-0.flac")[0].shape == (SAMPLE_RATE,)   # what soundfile alone does
    utterances = read_corpus(tmp_path, "dev")                            # indexing reads headers only
    assert utterances[0].num_samples == SAMPLE_RATE
    expected = (f"cannot read audio file {folder / '1-2-0.flac'}: its FLAC STREAMINFO header says 16000 samples "
                f"(1.000 s at 16000 Hz) but the file holds more; the header is wrong or the file damaged "
                f"(refused, not cut to the header's length; re-encode the file)")
    with pytest.raises(DataError) as error:
        read_audio(utterances[0])
    assert str(error.value) == expected
    with pytest.raises(DataError, match="but the file holds more"):
        AudioCache(utterances).waveform(0)


def test_flac_holding_less_than_its_header_says_is_refused(tmp_path):
    folder = tmp_path / "rec"
    _sphinx(folder, ["<s> hi </s> (a)"])
    _flac(folder / "a.flac", 1.0)
    _set_streaminfo_total(folder / "a.flac", 20 * SAMPLE_RATE)           # says 20 s, holds 1 s
    utterances = read_transcription_folder(folder)
    with pytest.raises(DataError, match=r"header says 320000 samples \(20\.000 s at 16000 Hz\) but the file holds "
                                        r"only 16000;"):
        read_audio(utterances[0])


@contextmanager
def warnings_allowed(channels):
    """Stereo files are mixed down with a warning; mono ones give none."""
    if channels == 1:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    else:
        with pytest.warns(UserWarning, match="mixed down"):
            yield


@pytest.mark.parametrize("channels", [1, 2])
def test_flac_with_unknown_length_is_counted_and_read_whole(tmp_path, channels):
    folder = tmp_path / "dev" / "1" / "2"
    folder.mkdir(parents=True)
    original = _flac(folder / "1-2-0.flac", 20.0, channels=channels)
    _set_streaminfo_total(folder / "1-2-0.flac", 0)                      # "unknown", legal FLAC
    (folder / "1-2.trans.txt").write_text("1-2-0 HI\n")
    assert soundfile.info(folder / "1-2-0.flac").frames == 2**63 - 1    # what libsndfile makes of it
    with warnings_allowed(channels):
        utterances = read_corpus(tmp_path, "dev")
    assert utterances[0].num_samples == 20 * SAMPLE_RATE and utterances[0].seconds == 20.0
    check_durations(utterances, min_samples=400, max_seconds=60, where="dev")
    with pytest.raises(DataError, match=r"longer than --max-seconds=10: .*\(20\.0 s\)"):
        check_durations(utterances, min_samples=400, max_seconds=10, where="dev")
    samples, rate = audio.read_audio_file(folder / "1-2-0.flac")
    assert rate == SAMPLE_RATE and np.array_equal(samples, original)
    assert read_audio(utterances[0]).shape == (20 * SAMPLE_RATE,)


def test_honest_flacs_read_exactly_as_soundfile_reads_them(tmp_path):
    for name, rate, channels, subtype in [("a", 16000, 1, "PCM_16"), ("b", 22050, 2, "PCM_24"),
                                          ("c", 8000, 1, "PCM_S8")]:
        samples = 0.3 * np.random.default_rng(1).standard_normal((rate // 2, channels))
        soundfile.write(tmp_path / f"{name}.flac", samples.astype(np.float32), rate, subtype=subtype)
        expected = soundfile.read(tmp_path / f"{name}.flac", dtype="float32", always_2d=True)[0]
        read, read_rate = audio.read_audio_file(tmp_path / f"{name}.flac")
        assert read_rate == rate and read.dtype == np.float32 and np.array_equal(read, expected)
        assert audio.audio_info(tmp_path / f"{name}.flac").frames == rate // 2
    # An ID3v2 tag in front of the FLAC stream (libsndfile reads such files) is skipped.
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 20]) + bytes(20)
    (tmp_path / "tagged.flac").write_bytes(tag + (tmp_path / "a.flac").read_bytes())
    assert np.array_equal(audio.read_audio_file(tmp_path / "tagged.flac")[0],
                          audio.read_audio_file(tmp_path / "a.flac")[0])
    # WAV is read by soundfile unchanged.
    soundfile.write(tmp_path / "d.wav", np.full(100, 0.5, np.float32), 16000, subtype="FLOAT")
    assert np.array_equal(audio.read_audio_file(tmp_path / "d.wav")[0], np.full((100, 1), 0.5, np.float32))
