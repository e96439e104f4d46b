"""What sequence models (char-RNN, Transformer) share: reading the data as a sequence,
the START input, the END convention, the sampling loop and nats per character.

A sequence model factorizes the flattened datapoint left to right,

    p(x) = prod_{t=0}^{T-1} p(x_t | x_<t),   logits_t = f(START, e(x_0), ..., e(x_{t-1})),

with a causal network ``f`` (an RNN, or masked self-attention) run on the inputs *shifted
right by one*: position ``t`` reads ``e(x_{t-1})``, position 0 a learned START vector
(:class:`ShiftedEmbedding`), so one teacher-forced pass gives every conditional. ``e`` is
a linear map of the units' features: the bit itself for binary data, the one-hot code for
levels (a linear map of a one-hot code *is* an embedding lookup, and it keeps a float input
path that tests differentiate through).

Two ways to read the data (:func:`sequence_for`, the ``sequence`` option of both models):

* ``raster``: every dimension of the flattened event is scored (pixels in raster order,
  Bernoulli or categorical; the PixelRNN / Image Transformer reading of an image).
* ``tokens``: END-padded strings (``experiments.names``). Token ``END = 0`` ends the
  string and pads the row; the other tokens are characters. Every position after the first
  END is END again, so its conditional is a point mass and contributes exactly 0 to
  ``log p``; the last position is END whatever came before (the model cannot emit a
  character there), so it contributes 0 too. The model is then a normalized distribution
  over strings of at most ``T - 1`` characters, each followed by its END::

      log p(c_1..c_n) = sum_{t<n} log p(c_{t+1} | c_<=t) + [n < T - 1] log p(END | c_1..c_n).

  Data that has a character after an END, or no END at all, is rejected (DataError).

``auto`` picks ``tokens`` for categorical data of one axis without an image shape (names),
``raster`` otherwise.

Conditioning: a model built with ``context_dim = L > 0`` (the char-RNN as the decoder of a
VAE, ``models/latent/ar_vae.py``) models ``p(x | h) = prod_t p(x_t | x_<t, h)`` for a context
vector ``h [B, L]`` that every density and sampling call then takes (``context=``); how the
network reads ``h`` is the subclass's business. ``context_dim = 0`` (the default) takes none.

Nats per character (:func:`nats_per_char`) divide the total NLL of a set of strings by
its number of symbols *including* each string's END (n + 1 for a name of n characters), the
usual convention of character-level language models.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from models.autoregressive.base import AutoregressiveModel
from models.base import DataError, DataSpec, DGMError
from models.nn.units import BinaryUnits, units_for

END = 0
"""The END (and padding) token of ``tokens`` sequences."""

SEQUENCE_MODES = ("auto", "raster", "tokens")


def ended_before(tokens: Tensor) -> Tensor:
    """``[B, T]`` bool: an END occurs strictly before position ``t``."""
    is_end = (tokens == END).long()
    return (is_end.cumsum(-1) - is_end) > 0


def num_symbols(tokens: Tensor) -> Tensor:
    """``[B]``: characters plus the END, i.e. the position of the first END + 1 (``T`` if none)."""
    return (~ended_before(tokens)).sum(-1)


def draw_tempered(units, logits: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
    """One draw from the units' distribution at ``logits / temperature``; the mode at 0."""
    if temperature == 0:
        if isinstance(units, BinaryUnits):
            return (logits > 0).to(logits.dtype)
        return logits.argmax(-1).to(logits.dtype)
    return units.sample(logits / temperature, generator)


class RasterScan:
    """Every position of the flattened event is scored and drawn (no END convention)."""

    mode = "raster"

    def __init__(self, spec: DataSpec, model: str):
        self.units = units_for(spec, model)
        self.levels = self.units.levels  # width of the features and of the logits
        self.length = spec.dim

    def check(self, flat: Tensor, what: str = "data") -> None:
        """Nothing beyond the data spec."""

    def features(self, flat: Tensor) -> Tensor:
        """``[..., T, levels]``: what the network reads at each position."""
        return self.units.features(flat)

    def log_prob(self, logits: Tensor, flat: Tensor) -> Tensor:
        """``[B, T]`` ``log p(x_t | x_<t)`` from logits ``[B, T, levels]``."""
        return self.units.log_prob(self.units.natural(logits), flat)

    def draw(
        self, logits: Tensor, x: Tensor, t: int, temperature: float, generator: Optional[torch.Generator]
    ) -> Tensor:
        """``[n]`` draws of ``x_t`` from logits ``[n, levels]``, given the prefix ``x[:, :t]``."""
        return draw_tempered(self.units, self.units.natural(logits), temperature, generator)


class EndPadded(RasterScan):
    """END-padded token strings: positions after the first END, and the last position,
    are END with probability one and contribute 0 (see the module docstring)."""

    mode = "tokens"

    def __init__(self, spec: DataSpec, model: str):
        if spec.support != "categorical" or len(spec.event_shape) != 1:
            raise DGMError(
                f"{model}: END-padded token strings are categorical data of shape [N, T], not "
                f"{spec.describe()}; use --opt sequence=raster"
            )
        if spec.event_shape[0] < 2:
            raise DGMError(f"{model}: token strings need length >= 2 (a character and its END)")
        super().__init__(spec, model)

    def check(self, flat: Tensor, what: str = "data") -> None:
        bad = (ended_before(flat) & (flat != END)).any(-1) | (flat[:, -1] != END)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise DataError(
                f"{what}: row {row} ({flat[row].long().tolist()}) is not an END-padded string: token {END} "
                "(END) must end every row (the last position included) and be followed only by END. "
                "Pad with 0 after the string and leave room for END, or use --opt sequence=raster "
                "if level 0 is not an END token"
            )

    def deterministic(self, flat: Tensor) -> Tensor:
        """``[B, T]`` bool: positions whose token is END with probability one."""
        fixed = ended_before(flat)
        fixed[:, -1] = True
        return fixed

    def log_prob(self, logits: Tensor, flat: Tensor) -> Tensor:
        return super().log_prob(logits, flat).masked_fill(self.deterministic(flat), 0.0)

    def draw(
        self, logits: Tensor, x: Tensor, t: int, temperature: float, generator: Optional[torch.Generator]
    ) -> Tensor:
        token = super().draw(logits, x, t, temperature, generator)
        done = (x[:, :t] == END).any(-1) if t < self.length - 1 else torch.ones_like(token, dtype=torch.bool)
        return token.masked_fill(done, float(END))


def sequence_for(spec: DataSpec, mode: str, model: str) -> RasterScan:
    """The reading of ``spec``'s data for ``mode`` (``auto``, ``raster`` or ``tokens``)."""
    if mode not in SEQUENCE_MODES:
        raise DGMError(f"{model}: unknown sequence {mode!r}; choose from {', '.join(SEQUENCE_MODES)}")
    if mode == "auto":
        one_axis_levels = spec.support == "categorical" and len(spec.event_shape) == 1 and spec.image_shape is None
        mode = "tokens" if one_axis_levels else "raster"
    return EndPadded(spec, model) if mode == "tokens" else RasterScan(spec, model)


class ShiftedEmbedding(nn.Module):
    """Network inputs shifted right by one: ``e_0 = START`` (learned), ``e_t = W f(x_{t-1}) + b``.

    Position ``t`` of a causal network fed these inputs sees ``x_<t`` and nothing else;
    forgetting the shift would let the conditional of ``x_t`` read ``x_t`` itself."""

    def __init__(self, levels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(levels, dim)
        self.start = nn.Parameter(torch.randn(dim) / dim**0.5)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, T, levels] -> [B, T, dim]``."""
        start = self.start.expand(features.shape[0], 1, -1)
        return torch.cat([start, self.proj(features[:, :-1])], dim=1)

    def at(self, previous: Optional[Tensor], n: int) -> Tensor:
        """``[n, dim]``: the input of one step, START if ``previous`` (features of
        ``x_{t-1}``, ``[n, levels]``) is None."""
        return self.start.expand(n, -1) if previous is None else self.proj(previous)


class SequenceModel(AutoregressiveModel):
    """Base of sequence models: subclasses build ``self.sequence`` (via :func:`sequence_for`)
    and implement ``logits`` (the teacher-forced pass) and ``step`` (one sampling step)."""

    sequence: RasterScan

    def logits(self, features: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``[B, T, levels]`` logits of ``x_t | x_<t`` from features ``[B, T, levels]`` of
        ``x_0..x_{T-1}`` (``T <= D``); position ``t`` must not read ``features[:, t:]``.
        ``context``: ``[B, context_dim]`` for a conditional model, else ``None``."""
        raise NotImplementedError

    def step(self, x: Tensor, t: int, state, context: Optional[Tensor] = None) -> Tuple[Tensor, object]:
        """``(logits [n, levels] of x_t, state)`` from the prefix ``x[:, :t]`` and the state
        the previous step returned (``None`` at ``t = 0``)."""
        raise NotImplementedError

    def check_data(self, x: Tensor, what: str = "data") -> None:
        super().check_data(x, what)
        self.sequence.check(x.reshape(x.shape[0], -1), what)

    def conditional_log_probs(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        self.sequence.check(flat)
        self.check_context(context, flat.shape[0])
        return self.sequence.log_prob(self.logits(self.sequence.features(flat), context), flat)

    def log_prob(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Exact ``log p(x)`` (``log p(x | context)`` for a conditional model) per datapoint."""
        return self.conditional_log_probs(x, context).sum(-1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        given: Optional[Tensor] = None,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
        context: Optional[Tensor] = None,
    ) -> Tensor:
        """``n`` ancestral samples ``[n, *event_shape]``, left to right. ``temperature``
        divides every logit (1: the model; -> 0: the most likely next symbol, exactly at 0;
        > 1: flatter). ``given`` clamps a known prefix (NaN where to draw; see the base
        class); for token strings it must itself be END-padded. ``context`` ``[n, context_dim]``:
        the conditioning of a conditional model, one row per sample."""
        if temperature < 0:
            raise DGMError(f"temperature must be >= 0, got {temperature}")
        self.check_context(context, n)
        known = self.known_mask(given, n)
        if given is not None:
            self.sequence.check(given.reshape(n, -1).nan_to_num(float(END)), "given")
        x = torch.zeros(n, self.data_spec.dim, device=self.device, dtype=self.dtype)
        state = None
        for t in range(self.data_spec.dim):
            logits, state = self.step(x, t, state, context)
            x[:, t] = self.sequence.draw(logits, x, t, temperature, generator)
            self.clamp(x, given, known, t)
        return x.reshape((n,) + tuple(self.data_spec.event_shape))


@torch.no_grad()
def nats_per_char(model: AutoregressiveModel, tokens: Tensor, batch_size: int = 1000) -> float:
    """``-sum_x log p(x) / sum_x (characters of x + 1)`` over END-padded strings ``tokens``
    (the END counts as a symbol), evaluated in eval mode."""
    mode = model.training
    model.eval()
    try:
        total = sum(float(model.log_prob(tokens[i : i + batch_size]).sum()) for i in range(0, len(tokens), batch_size))
    finally:
        model.train(mode)
    return -total / float(num_symbols(tokens.reshape(len(tokens), -1)).sum())
