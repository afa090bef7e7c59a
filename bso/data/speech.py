"""Google Speech Commands (paper Table 5): one-second 16 kHz WAV clips of spoken words.

Layout (torchaudio's, v0.02): ``<root>/<word>/<speaker>_nohash_<n>.wav`` for each word, plus
``validation_list.txt`` and ``testing_list.txt`` (paths relative to ``<root>``). The test split is
``testing_list.txt``; training is every clip in neither list. ``_background_noise_`` is not a class.

Features (the paper gives only the 32x32 input and its normalisation; the rest is our choice):
a log-Mel spectrogram (40 bands, 30 ms windows, 10 ms hop) scaled to [0, 1] per clip, resized to
32x32 and normalised with mean 0.5 / std 0.5. Computed with torch alone (no torchaudio).
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bso.data.errors import DataError

SAMPLE_RATE = 16_000


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-style Mel filters, [n_mels, n_fft // 2 + 1]."""

    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower = (freqs[None] - hz[:-2, None]) / (hz[1:-1, None] - hz[:-2, None])
    upper = (hz[2:, None] - freqs[None]) / (hz[2:, None] - hz[1:-1, None])
    return torch.clamp(torch.minimum(lower, upper), min=0.0)


def read_wav(path: Path) -> torch.Tensor:
    """Mono 16-bit PCM WAV -> float waveform in [-1, 1], padded or cut to one second."""
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2 or f.getnchannels() != 1:
                raise ValueError(
                    f"expected mono 16-bit PCM, got {f.getnchannels()} channel(s), "
                    f"{8 * f.getsampwidth()}-bit"
                )
            data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    except (wave.Error, EOFError, ValueError) as err:
        raise DataError(f"cannot read speech clip {path}: {err}") from err
    x = torch.from_numpy(data.astype(np.float32) / 32768.0)
    return F.pad(x, (0, max(0, SAMPLE_RATE - len(x))))[:SAMPLE_RATE]


class SpeechCommands(Dataset):
    def __init__(
        self, root: Path, files: list[Path], classes: list[str], size: int = 32, n_mels: int = 40
    ):
        self.root, self.files, self.size = root, files, size
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.n_fft, self.hop = 480, 160
        self.filters = mel_filterbank(self.n_fft, n_mels, SAMPLE_RATE)
        self.window = torch.hann_window(self.n_fft)

    def __len__(self) -> int:
        return len(self.files)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, return_complex=True)
        logmel = torch.log(self.filters @ spec.abs().pow(2) + 1e-6)  # [n_mels, frames]
        logmel = (logmel - logmel.min()) / (logmel.max() - logmel.min() + 1e-8)  # [0, 1]
        img = F.interpolate(
            logmel[None, None], size=(self.size, self.size), mode="bilinear", align_corners=False
        )[0]
        return (img - 0.5) / 0.5

    def __getitem__(self, i: int):
        path = self.files[i]
        return self.features(read_wav(path)), self.class_to_idx[path.parent.name]


def speech_commands_datasets(root, size: int = 32):
    root = Path(root)
    lists = [root / "validation_list.txt", root / "testing_list.txt"]
    words = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
        if root.is_dir()
        else []
    )
    if not words or not all(f.is_file() for f in lists):
        raise FileNotFoundError(
            f"Google Speech Commands not found at {root.resolve()}.\n"
            f"Expected layout: {root}/<word>/*.wav (one folder per word), "
            f"{root}/validation_list.txt and {root}/testing_list.txt (v0.02 as released). "
            "Get speech_commands_v0.02.tar.gz from the TensorFlow datasets storage (see "
            "torchaudio.datasets.SPEECHCOMMANDS) and extract it there, or set dataset.root."
        )
    held_out = {}
    for name, f in zip(("validation", "testing"), lists, strict=True):
        held_out[name] = {line.strip() for line in f.read_text().splitlines() if line.strip()}
    train, test = [], []
    for word in words:
        for wav in sorted((root / word).glob("*.wav")):
            rel = f"{word}/{wav.name}"
            if rel in held_out["testing"]:
                test.append(wav)
            elif rel not in held_out["validation"]:
                train.append(wav)
    return SpeechCommands(root, train, words, size), SpeechCommands(root, test, words, size)
