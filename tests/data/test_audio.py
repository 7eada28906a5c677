"""aqa.data.audio: every supported format decodes to 16 kHz mono float32; bad files raise AudioError with a reason."""

import numpy as np
import pytest
import soundfile as sf

from aqa.data.audio import MIN_DURATION_S, SAMPLE_RATE, AudioError, audio_duration, decode_audio, load_audio
from tests.helpers import sine, write_sine

TONE_HZ = 440.0  # the frequency of helpers.sine (amplitude 0.5)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


GOOD = [
    ("wav", "PCM_16", 8000, 1),
    ("wav", "PCM_24", 22050, 2),
    ("wav", "FLOAT", 32000, 1),
    ("wav", "DOUBLE", 44100, 2),
    ("wav", "PCM_32", 48000, 1),
    ("wav", "PCM_U8", 16000, 1),
    ("wav", "PCM_16", 44100, 6),
    ("flac", "PCM_24", 44100, 2),
    ("ogg", "VORBIS", 48000, 2),
]


@pytest.mark.parametrize("ext,subtype,sr,channels", GOOD)
def test_good_formats_become_16k_mono_float32(tmp_path, ext, subtype, sr, channels):
    path = tmp_path / f"clip.{ext}"
    write_sine(path, 0.5, sr, channels=channels, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 0.5 * SAMPLE_RATE) <= 2
    # The content survives decoding, downmixing and resampling: same pitch, same level.
    assert abs(peak_hz(y, SAMPLE_RATE) - TONE_HZ) < 5
    rms = float(np.sqrt(np.mean(y[800:-800] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_downmix_averages_channels(tmp_path):
    left = sine(0.3, SAMPLE_RATE)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), left / 2, atol=1e-6)


def test_16k_mono_passes_through_unchanged(tmp_path):
    x = sine(0.2, SAMPLE_RATE)
    sf.write(tmp_path / "m.wav", x, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "m.wav"), x)


def test_long_clip_is_kept_whole(tmp_path):
    write_sine(tmp_path / "long.flac", 45.0, 22050)
    y = load_audio(tmp_path / "long.flac")
    assert abs(len(y) - 45 * SAMPLE_RATE) <= 2
    assert audio_duration(tmp_path / "long.flac") == pytest.approx(45.0, abs=1e-3)


def test_decode_keeps_native_rate_and_channels(tmp_path):
    write_sine(tmp_path / "a.wav", 0.25, 32000, channels=2, subtype="PCM_24")
    dec = decode_audio(tmp_path / "a.wav")
    assert dec.sample_rate == 32000 and dec.channels == 2 and dec.samples.shape == (8000, 2)
    assert dec.duration_s == pytest.approx(0.25)


def test_exactly_minimum_duration_is_accepted(tmp_path):
    write_sine(tmp_path / "min.wav", MIN_DURATION_S, SAMPLE_RATE)
    assert len(load_audio(tmp_path / "min.wav")) == int(MIN_DURATION_S * SAMPLE_RATE)


def _bad_files(tmp_path):
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x01this is not audio at all" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    nan = sine(0.2, SAMPLE_RATE)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    inf = sine(0.2, SAMPLE_RATE)
    inf[5] = np.inf
    sf.write(tmp_path / "inf.wav", inf, SAMPLE_RATE, subtype="FLOAT")
    write_sine(tmp_path / "short.wav", 0.03, 44100)
    (tmp_path / "folder.wav").mkdir()


@pytest.mark.parametrize(
    "name,reason",
    [
        ("missing.wav", "not found"),
        ("zero.wav", "cannot decode"),
        ("garbage.wav", "cannot decode"),
        ("empty.wav", "empty"),
        ("nan.wav", "NaN/inf"),
        ("inf.wav", "NaN/inf"),
        ("short.wav", "under the 50 ms minimum"),
        ("folder.wav", "not a file"),
    ],
)
def test_bad_files_raise_audio_error_with_reason(tmp_path, name, reason):
    _bad_files(tmp_path)
    with pytest.raises(AudioError, match=reason) as info:
        load_audio(tmp_path / name)
    assert isinstance(info.value, ValueError)
    assert name in str(info.value)  # the message names the file
