"""Spoken words synthesized with espeak-ng: a small, license-free speech data set for WaveNet.

Source: the ``espeak-ng`` text-to-speech program (Debian/Ubuntu: ``apt install espeak-ng``)
says each word of :data:`SPEECH_WORDS` (the 35-word vocabulary of Google's Speech
Commands, digits included) in every voice of :data:`SPEECH_VOICES`, at every speed
(``-s``, words per minute) of :data:`SPEECH_SPEEDS` and pitch (``-p``, 0-99) of
:data:`SPEECH_PITCHES`: 35 x 6 x 2 x 2 = 840 utterances by default.

Processing of each utterance (espeak-ng writes 16-bit mono WAV at 22,050 Hz):

1. resampled to ``rate`` (8 kHz) by polyphase filtering, ``scipy.signal.resample_poly``
   (a Kaiser-windowed FIR low-pass at the new Nyquist frequency; scipy comes with
   scikit-learn), so nothing above 4 kHz aliases into the band;
2. leading and trailing silence (below 1 % of the peak) trimmed, keeping
   :data:`MARGIN_SECONDS` on each side;
3. peak-normalized to :data:`PEAK`, mu-law companded and quantized to ``levels`` levels
   (:func:`~models.nn.mulaw.mu_law_encode`);
4. cut into clips of ``length`` samples (default 4,000 = 0.5 s) by :func:`clips`: an
   utterance shorter than that is padded at the end with silence (the level of 0.0), a
   longer one is covered by ``ceil(len / length)`` evenly spaced, overlapping windows (so
   clips hold speech, not padding). The data is categorical, event shape ``(length,)``,
   levels stored as float32.

Split: the (word, voice) pairs are shuffled by a fixed permutation (``split_seed``,
independent of the run's seed, as for digits and names) and cut 80 / 10 / 10 % into train,
val and test groups; every utterance and clip of a pair goes to its pair's split, so no
word is heard in the same voice in two splits (speeds and pitches of one voice are not
independent recordings). Labels are word indices into ``words``.

Cache: the arrays are stored in ``${XDG_CACHE_HOME:-~/.cache}/pyro-dgm/speech`` under a
name hashing every parameter and the espeak-ng version (another version says words
differently), written to a temporary file and moved into place (``os.replace``), so an
interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from experiments.data import Dataset
from experiments.reporting import AudioSamples
from models.base import DataError, DataSpec
from models.nn.mulaw import mu_law_decode, mu_law_encode

SPEECH_WORDS: Tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "backward", "bed", "bird", "cat", "dog", "down", "follow", "forward", "go", "happy",
    "house", "learn", "left", "marvin", "no", "off", "on", "right", "sheila", "stop",
    "tree", "up", "visual", "wow", "yes",
)  # fmt: skip
"""The Speech Commands v2 vocabulary (Warden 2018), digits first."""

SPEECH_VOICES: Tuple[str, ...] = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-029+f2", "en-gb-x-rp+m3")
"""espeak-ng voices (``-v``): accents, with ``+variant`` female/male variants."""

SPEECH_SPEEDS: Tuple[int, ...] = (130, 175)
SPEECH_PITCHES: Tuple[int, ...] = (35, 65)
SPEECH_RATE = 8_000
SPEECH_LENGTH = 4_000
SPEECH_LEVELS = 256
SPEECH_SPLIT_SEED = 0
SPEECH_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
PEAK = 0.9
SILENCE = 0.01  # of the peak: quieter samples at either end are trimmed
MARGIN_SECONDS = 0.02
CACHE_FORMAT = 2  # bump when the processing changes: old caches are then ignored

INSTALL_HINT = "apt install espeak-ng"


def speech_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/pyro-dgm/speech``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro-dgm" / "speech"


def espeak_ng() -> Tuple[str, str]:
    """``(path, version line)`` of espeak-ng, or a DataError saying how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(
            f"the speech dataset synthesizes words with espeak-ng, which is not on PATH: {INSTALL_HINT} "
            "(or your system's package of espeak-ng)"
        )
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    return exe, out.stdout.strip().split("Data at")[0].strip()


def synthesize(exe: str, word: str, voice: str, speed: int, pitch: int) -> Tuple[np.ndarray, int]:
    """``(samples in [-1, 1), rate)`` of espeak-ng saying ``word``."""
    with tempfile.TemporaryDirectory(prefix="pyro-dgm-speech-") as tmp:
        path = os.path.join(tmp, "word.wav")
        done = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, word],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0 or not os.path.exists(path):
            raise DataError(
                f"espeak-ng failed for {word!r} in voice {voice!r}: {done.stderr.strip() or done.returncode}"
            )
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise DataError(
                    f"espeak-ng wrote {w.getnchannels()} channels of {8 * w.getsampwidth()} bits; expected mono 16-bit"
                )
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float64) / 32768.0, rate


def resample(x: np.ndarray, source: int, target: int) -> np.ndarray:
    """Polyphase resampling ``source -> target`` Hz (anti-aliasing FIR, scipy)."""
    try:
        from scipy.signal import resample_poly
    except ImportError:  # pragma: no cover - scipy is a dependency of scikit-learn
        raise DataError("resampling speech needs scipy: pip install scipy") from None
    g = math.gcd(source, target)
    return resample_poly(x, target // g, source // g)


def trim_and_normalize(x: np.ndarray, rate: int) -> np.ndarray:
    """Drop the silence at both ends (keeping a margin) and scale the peak to ``PEAK``."""
    peak = np.abs(x).max()
    if peak == 0:
        raise DataError("espeak-ng produced silence")
    loud = np.nonzero(np.abs(x) >= SILENCE * peak)[0]
    margin = int(MARGIN_SECONDS * rate)
    x = x[max(0, loud[0] - margin) : loud[-1] + 1 + margin]
    return x * (PEAK / peak)


def clips(levels: np.ndarray, length: int, silence: float) -> np.ndarray:
    """``[n, length]`` windows covering ``levels``: one padded at the end with ``silence`` if
    it is shorter than ``length``, else ``n = ceil(len / length)`` windows at evenly spaced
    starts from 0 to ``len - length`` (overlapping rather than padded with silence)."""
    if len(levels) <= length:
        padded = np.full(length, silence, dtype=levels.dtype)
        padded[: len(levels)] = levels
        return padded[None]
    n = -(-len(levels) // length)
    starts = np.round(np.linspace(0, len(levels) - length, n)).astype(int)
    return np.stack([levels[s : s + length] for s in starts])


def split_groups(groups: Sequence[Tuple[str, str]], seed: int) -> Dict[str, List[Tuple[str, str]]]:
    """The (word, voice) groups of each split: a fixed permutation cut 80/10/10, at least one
    group in val and test."""
    if len(groups) < 3:
        raise DataError(f"the speech split needs at least 3 (word, voice) pairs, got {len(groups)}")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(SPEECH_FRACTIONS["val"] * len(groups)))
    n_test = max(1, round(SPEECH_FRACTIONS["test"] * len(groups)))
    n_train = len(groups) - n_val - n_test
    cut = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {part: sorted(groups[i] for i in idx) for part, idx in cut.items()}


def _build(exe: str, params: dict) -> Dict[str, np.ndarray]:
    """Synthesize and process everything: arrays of levels and labels per split. espeak-ng
    runs in a few worker threads (each call is a subprocess), the results kept in order."""
    words, length, levels, rate = params["words"], params["length"], params["levels"], params["rate"]
    silence = float(mu_law_encode(torch.zeros(()), levels))
    groups = split_groups([(w, v) for w in words for v in params["voices"]], params["split_seed"])
    dtype = np.uint8 if levels <= 256 else np.uint16

    def utterance(job: Tuple[str, str, int, int]) -> np.ndarray:
        audio, source = synthesize(exe, *job)
        audio = trim_and_normalize(resample(audio, source, rate), rate)
        q = mu_law_encode(torch.from_numpy(np.clip(audio, -1, 1)), levels).numpy().astype(dtype)
        return clips(q, length, silence)

    arrays = {}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for part, pairs in groups.items():
            jobs = [(w, v, s, p) for w, v in pairs for s in params["speeds"] for p in params["pitches"]]
            rows = list(pool.map(utterance, jobs))
            arrays[part] = np.concatenate(rows)
            arrays[f"{part}_labels"] = np.concatenate(
                [np.full(len(r), words.index(job[0]), dtype=np.int64) for r, job in zip(rows, jobs)]
            )
            arrays[f"{part}_groups"] = np.asarray([f"{w}/{v}" for w, v in pairs])
    return arrays


def _save_atomic(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".speech-", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_speech(
    *,
    length: int = SPEECH_LENGTH,
    levels: int = SPEECH_LEVELS,
    rate: int = SPEECH_RATE,
    words: Sequence[str] = SPEECH_WORDS,
    voices: Sequence[str] = SPEECH_VOICES,
    speeds: Sequence[int] = SPEECH_SPEEDS,
    pitches: Sequence[int] = SPEECH_PITCHES,
    split_seed: int = SPEECH_SPLIT_SEED,
    cache_dir: Optional[Union[str, Path]] = None,
) -> Dataset:
    """The speech :class:`~experiments.data.Dataset` (see the module docstring): clips
    ``[N, length]`` of mu-law levels ``0..levels-1``, labels = word indices. Built once and
    cached (``cache_dir``, default :func:`speech_cache_dir`)."""
    if length < 1 or rate < 1 or not 2 <= levels <= 65_536:
        raise DataError(f"need length >= 1, rate >= 1 and 2 <= levels <= 65536, got {length}, {rate}, {levels}")
    if not words or not voices or not speeds or not pitches:
        raise DataError("the speech dataset needs at least one word, voice, speed and pitch")
    exe, version = espeak_ng()
    params = {
        "words": list(words),
        "voices": list(voices),
        "speeds": [int(s) for s in speeds],
        "pitches": [int(p) for p in pitches],
        "rate": int(rate),
        "length": int(length),
        "levels": int(levels),
        "split_seed": int(split_seed),
        "peak": PEAK,
        "silence": SILENCE,
        "margin_seconds": MARGIN_SECONDS,
        "format": CACHE_FORMAT,
        "espeak_ng": version,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) if cache_dir is not None else speech_cache_dir()
    path = path / f"speech-{key}.npz"
    if not path.exists():
        _save_atomic(path, _build(exe, params))
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    info = {
        "source": f"{version}: {len(words)} words x {len(voices)} voices x {len(speeds)} speeds x "
        f"{len(pitches)} pitches",
        **{k: params[k] for k in ("words", "voices", "speeds", "pitches", "rate", "levels", "length")},
        "binarization": f"none (mu-law, {levels} levels)",
        "processing": "resample_poly to rate, trim silence < 1% of peak (20 ms margin), peak 0.9, "
        "mu-law, cut into evenly spaced windows of length (padded with silence if shorter)",
        "split": f"(word, voice) pairs by a fixed permutation (seed {split_seed}), 80/10/10",
        "groups": {part: arrays[f"{part}_groups"].tolist() for part in ("train", "val", "test")},
        "cache": str(path),
    }
    return Dataset(
        "speech",
        DataSpec((int(length),), "categorical", num_levels=int(levels)),
        **{part: torch.from_numpy(arrays[part].astype(np.float32)) for part in ("train", "val", "test")},
        **{f"{part}_labels": torch.from_numpy(arrays[f"{part}_labels"]) for part in ("train", "val", "test")},
        info=info,
        samples=AudioSamples(int(levels), int(params["rate"])),
    )


def write_wav(path: Union[str, Path], levels: torch.Tensor, num_levels: int = SPEECH_LEVELS, rate: int = SPEECH_RATE):
    """Decode mu-law ``levels`` (one sequence ``[T]``) and write 16-bit mono PCM to ``path``."""
    audio = mu_law_decode(levels.detach().double().cpu().reshape(-1), num_levels).clamp(-1, 1)
    pcm = (audio.numpy() * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return Path(path)
