"""Benchmark: epoch-2 loading from the feature cache against decode + resample + extract every time.

    python bench/data_cache.py [--clips 240] [--seed 0]

Writes a few hundred generated clips of mixed rates, channel counts and formats (WAV PCM16/PCM24/float,
FLAC, OGG) to a temporary directory, extracts Whisper-style 128-bin log-mels (transformers'
WhisperFeatureExtractor, 30 s windows: [128, 3000] float32 per clip) and times one pass over every
question both ways. The last line holds ``speedup=X.XX`` (the target is >= 10).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm
from transformers import WhisperFeatureExtractor

from aqa.data.audio import load_audio
from aqa.data.cache import FeatureCache, build_feature_cache
from aqa.data.dataset import QADataset
from aqa.data.manifest import Manifest, Record

# (rate, channels, format, subtype): the mix of inputs the audio loader must handle
FORMATS = [
    (16000, 1, "WAV", "PCM_16"),
    (8000, 1, "WAV", "PCM_16"),
    (22050, 2, "WAV", "PCM_24"),
    (32000, 1, "WAV", "FLOAT"),
    (44100, 2, "FLAC", "PCM_16"),
    (48000, 1, "OGG", "VORBIS"),
]


def write_clips(audio_dir: Path, n: int, seed: int) -> list[str]:
    """``n`` clips of 2-10 s, tones over noise, cycling through FORMATS; returns their file names."""
    rng = np.random.default_rng(seed)
    names = []
    for i in tqdm(range(n), desc="writing clips", unit="clip"):
        rate, channels, fmt, subtype = FORMATS[i % len(FORMATS)]
        seconds = rng.uniform(2.0, 10.0)
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
        wave = (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)  # [S]
        data = np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave  # [S, C] or [S]
        name = f"clip{i:04d}.{fmt.lower()}"
        sf.write(str(audio_dir / name), data, rate, format=fmt, subtype=subtype)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=240, help="number of generated clips (one question each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    fe = WhisperFeatureExtractor(feature_size=128)  # Whisper-large-v3 / Qwen2-Audio front end

    def extract(wave: np.ndarray) -> dict[str, np.ndarray]:
        # [S] float32 16 kHz -> {"input_features": [128, 3000] float32}
        return {"input_features": fe(wave, sampling_rate=16000, return_tensors="np")["input_features"][0]}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        audio = root / "audio"
        audio.mkdir()
        names = write_clips(audio, args.clips, args.seed)
        records = [Record(id=f"q{i}", part="bench", split="train", audio=name, question="What is heard?",
                          choices=["a tone", "silence"], answer="a tone") for i, name in enumerate(names)]
        manifest = Manifest(path=root / "train.jsonl", audio_root=audio, records=records)

        # without a cache: every epoch decodes, resamples and extracts every clip
        start = time.perf_counter()
        for rec in tqdm(records, desc="decode + resample + extract", unit="clip"):
            extract(load_audio(manifest.audio_path(rec)))
        uncached = time.perf_counter() - start

        # epoch 1 builds the cache (the same work once, plus writing)
        start = time.perf_counter()
        build_feature_cache(manifest, root / "cache", extract, fe.to_dict())
        build = time.perf_counter() - start

        # epoch 2, timed as a fresh run sees it: reopen the cache (map the shards, stat each clip once)
        # and read every question's features from the memory map
        start = time.perf_counter()
        dataset = QADataset(manifest, FeatureCache(root / "cache", fe.to_dict()))
        shapes = {dataset[i].features["input_features"].shape for i in tqdm(range(len(dataset)),
                                                                           desc="epoch 2 from cache", unit="clip")}
        cached = time.perf_counter() - start
        assert shapes == {(128, 3000)}, shapes

    n = len(records)
    print(f"clips={n} formats={len(FORMATS)} features=[128, 3000] float32")
    print(f"uncached epoch: {uncached:.2f} s ({1000 * uncached / n:.2f} ms/clip)")
    print(f"cache build (epoch 1): {build:.2f} s ({1000 * build / n:.2f} ms/clip)")
    print(f"cached epoch 2: {cached:.3f} s ({1000 * cached / n:.3f} ms/clip)")
    print(f"speedup={uncached / cached:.2f}")


if __name__ == "__main__":
    main()
