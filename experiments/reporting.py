"""What a dataset adds to a run's report: how its samples are written, and the metrics that
only mean something for it. A :class:`~experiments.data.Dataset` carries one
:class:`SampleFormat` (``samples``) and a tuple of :class:`Measure` (``measures``), set by
its loader; the run code calls them without knowing which dataset it holds.

Formats: images (a PNG grid), 2-D points (a scatter, plus the density where the model has
an exact one), text (END-padded strings such as names), audio (a WAV clip), none.
Measures: bits/dim of MNIST in logit space (pixel space, exact models only), bits/dim of
dequantized levels, nats per character of strings.

Plotting libraries are imported only when a picture is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor

from models.base import DataSpec, GenerativeModel


class SampleFormat:
    """How samples of a dataset are written. ``default_name`` is the file ``dgm sample``
    writes into the run directory when no ``--out`` is given."""

    default_name = "samples.png"
    default_n = 64

    def write(self, model: GenerativeModel, out: Optional[Path], run_dir: Path, n: Optional[int] = None, title=""):
        """Write ``n`` samples to ``out`` (default ``run_dir/default_name``); returns the path."""
        path = Path(out) if out is not None else Path(run_dir) / self.default_name
        return self._write(model, path, n or self.default_n, title)

    def _write(self, model, path: Path, n: int, title: str) -> Path:
        raise NotImplementedError

    def write_run_outputs(self, model: GenerativeModel, data, run_dir: Path, title: str) -> None:
        """What a finished run writes beside its summary (default: a sample file)."""
        self.write(model, None, run_dir, title=title)


@dataclass
class ImageSamples(SampleFormat):
    spec: DataSpec

    def _write(self, model, path, n, title):
        from experiments.plots import save_samples

        return save_samples(model, self.spec, path, n=n, title=title)


@dataclass
class PointSamples(SampleFormat):
    """2-D data: a scatter of samples; a model with exact log p(x) also gets its density."""

    spec: DataSpec
    default_n = 2000

    def _write(self, model, path, n, title):
        from experiments.plots import save_samples

        return save_samples(model, self.spec, path, n=n, title=title)

    def write_run_outputs(self, model, data, run_dir, title):
        super().write_run_outputs(model, data, run_dir, title)
        if model.has_exact_log_prob:
            from experiments.density_plots import save_density_plot

            save_density_plot(model, Path(run_dir) / "density.png", data=data.train[:20_000].cpu(), title=title)


@dataclass
class TextSamples(SampleFormat):
    """END-padded strings over ``alphabet``: sampled strings at two temperatures."""

    alphabet: str
    default_name = "samples.txt"
    default_n = 20

    def _write(self, model, path, n, title):
        from experiments.plots import save_text_samples

        save_text_samples(model, self.alphabet, path, n=n)
        print(Path(path).read_text(), end="")
        return Path(path)

    def write_run_outputs(self, model, data, run_dir, title):
        from experiments.plots import save_text_samples

        save_text_samples(model, self.alphabet, Path(run_dir) / self.default_name)


@dataclass
class AudioSamples(SampleFormat):
    """Mu-law levels: one sampled clip as 16-bit PCM WAV at ``rate`` Hz."""

    num_levels: int
    rate: int
    default_name = "samples.wav"
    default_n = 1

    def _write(self, model, path, n, title):
        from experiments.speech import write_wav
        from inference.device import eval_mode

        with eval_mode(model), torch.no_grad():
            write_wav(path, model.sample(n).reshape(-1).cpu(), self.num_levels, self.rate)
        return Path(path)

    def write_run_outputs(self, model, data, run_dir, title):
        pass  # sampling audio is slow: `dgm sample` does it on request


class NoSamples(SampleFormat):
    def write(self, model, out, run_dir, n=None, title=""):
        from models.base import DGMError

        raise DGMError("this dataset has no sample format (neither images, 2-D points, text nor audio)")

    def write_run_outputs(self, model, data, run_dir, title):
        pass


def default_format(spec: DataSpec) -> SampleFormat:
    if spec.image_shape is not None:
        return ImageSamples(spec)
    if spec.dim == 2:
        return PointSamples(spec)
    return NoSamples()


# --- measures ------------------------------------------------------------------------------------
class Measure:
    """A dataset-specific metric: ``__call__(model, data, summary, x_test)`` returns entries
    for the summary's ``test`` section (and, under the key ``"run"``, for the summary).
    ``x_test`` is the whole test split; the evaluated rows are its first
    ``summary["test"]["n"]``."""

    def __call__(self, model: GenerativeModel, data, summary: dict, x_test: Tensor) -> Dict:
        raise NotImplementedError


class LogitBitsPerDim(Measure):
    """Pixel-space bits/dim of an exact model fitted in logit space (``mnist-logit``)."""

    def __call__(self, model, data, summary, x_test):
        test = summary["test"]
        if test["estimator"] != "exact":
            return {}
        return {"bits_per_dim": logit_bits_per_dim(test["nll"], x_test[: test["n"]])}


def logit_bits_per_dim(nll: float, y: Tensor) -> float:
    """Mean bits/dim in pixel space of the evaluated test points ``y``, from their mean NLL in
    logit space (``models.flows.logit_bits_per_dim`` is linear in log p, so means commute)."""
    from models.flows import logit_bits_per_dim as per_point

    return float(per_point(torch.full((y.shape[0],), -nll, dtype=torch.float64), y.double()).mean())


@dataclass
class LevelsBitsPerDim(Measure):
    """Dequantized levels on [0, 1]: bits/dim of the discrete levels, ``-(log p - D log L) / (D log 2)``."""

    levels: int

    def __call__(self, model, data, summary, x_test):
        d = data.spec.dim
        return {"bits_per_dim": (summary["test"]["nll"] + d * math.log(self.levels)) / (d * math.log(2))}


class NatsPerChar(Measure):
    """END-padded strings: nats per character (END included), exact on val and test for
    exact models, and estimated from the test NLL for latent-variable models."""

    def __call__(self, model, data, summary, x_test):
        from models.autoregressive.sequence import nats_per_char, num_symbols

        device = model.device
        if model.has_exact_log_prob:
            return {
                "nats_per_char": nats_per_char(model, x_test.to(device)),
                "run": {"val_nats_per_char": nats_per_char(model, data.val.to(device))},
            }
        evaluated = x_test[: summary["test"]["n"]]  # the estimate's rows: the same names' symbols
        symbols = float(num_symbols(evaluated.reshape(len(evaluated), -1)).sum())
        return {"nats_per_char": summary["test"]["nll"] * len(evaluated) / symbols, "nats_per_char_estimated": True}
