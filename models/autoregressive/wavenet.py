"""WaveNet: an autoregressive model of 1-D sequences built from causal dilated convolutions
(van den Oord et al. 2016), with fast cached generation (Paine et al. 2016).

A datapoint is a sequence ``x_0..x_{T-1}`` (audio samples quantized to ``K`` levels, or any
binary / categorical data read in raster order, e.g. MNIST as 784 bits), modelled as

    p(x) = prod_t p(x_t | x_{t-R}, .., x_{t-1}),

each conditional a softmax over ``K`` levels (a Bernoulli logit for bits) computed by:

1. **Shifted input embedding** (:class:`~models.autoregressive.sequence.ShiftedEmbedding`):
   ``e_t = W f(x_{t-1}) + b`` and ``e_0 = START`` (learned), ``f`` the one-hot code of a
   level or the bit itself: a 1x1 causal convolution of the inputs shifted right by one,
   so position ``t`` of everything above reads ``x_<t`` only.
2. **Gated residual layers** (:class:`~models.nn.dilated.GatedResidualBlock`) with
   dilations ``1, 2, .., 2^(L-1)``, repeated ``stacks`` times, kernel size ``k``:
   ``z = tanh(W_f * h) . sigmoid(W_g * h)``, ``h <- h + V_r z``, skip output ``V_s z``.
3. **Output head** on the sum of the skip outputs: ``ReLU -> 1x1 -> ReLU -> 1x1 -> K``
   logits.

Each layer sees its input at ``t, t - d, .., t - (k-1) d``, so output ``t`` depends on
``x_{t-R}..x_{t-1}`` exactly, with the **receptive field**

    R = 1 + sum_layers (k - 1) d_l = 1 + stacks (k - 1)(2^L - 1)

(the 1 is the shift). One teacher-forced pass gives all ``T`` conditionals; sampling draws
``x_0, x_1, ..`` in turn. :meth:`WaveNet.sample` with ``cached=True`` keeps each layer's
last ``(k - 1) d`` inputs in a queue (:class:`~models.nn.dilated.InputQueue`), so a new
sample costs one step per layer (O(layers) work, Paine et al. 2016); ``cached=False``
recomputes the whole network over the prefix for every sample (O(t) work at step ``t``).
Both draw from the same conditionals and consume the generator identically, so with the
same generator they return the same samples.

Audio is mu-law companded before quantization (ITU-T G.711; WaveNet Section 2.2):
``F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)`` with ``mu = K - 1``, then ``F`` in [-1, 1]
is rounded to ``K`` evenly spaced levels (:mod:`models.nn.mulaw`).

Presets: ``small`` (tests), ``mnist`` (raster MNIST: 10 layers, ``R = 1024`` covers the 784
pixels; WaveNet has no MNIST architecture, this is ours), ``speech`` (8 kHz audio: 2 stacks of
9 layers, ``R = 1023`` samples = 128 ms, small channels so it trains on a CPU; the paper's
16 kHz models use ~3,000-sample fields and more channels).

References: A. van den Oord et al., "WaveNet: a generative model for raw audio",
arXiv:1609.03499, 2016; T. Le Paine et al., "Fast WaveNet generation algorithm",
arXiv:1611.09482, 2016.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn

from models.autoregressive.base import AutoregressiveModel
from models.autoregressive.sequence import ShiftedEmbedding, sequence_for
from models.base import DataSpec, DGMError
from models.nn.dilated import GatedResidualBlock, dilation_schedule
from models.nn.mulaw import mu_law_decode, mu_law_encode  # re-exported: the codec lives in models.nn.mulaw
from models.registry import register_model

__all__ = ["WaveNet", "WaveNetConfig", "PRESETS", "mu_law_encode", "mu_law_decode"]


# --- the model ---------------------------------------------------------------------------------------


@dataclass
class WaveNetConfig:
    """``layers`` per stack (dilations ``1..2^(layers-1)``), ``stacks`` repeats of them,
    ``kernel_size`` of every dilated conv; channel widths of the residual stream, the gated
    units, the skip outputs and the hidden layer of the output head."""

    residual_channels: int = 32
    dilation_channels: int = 32
    skip_channels: int = 64
    head_channels: int = 64
    kernel_size: int = 2
    layers: int = 10
    stacks: int = 1


PRESETS = {
    "small": WaveNetConfig(residual_channels=8, dilation_channels=8, skip_channels=16, head_channels=16, layers=3),
    "mnist": WaveNetConfig(layers=10, stacks=1),
    "speech": WaveNetConfig(skip_channels=64, head_channels=128, layers=9, stacks=2),
}


@register_model
class WaveNet(AutoregressiveModel):
    """Gated causal dilated convolutions over binary or categorical sequences, with cached generation."""

    name = "wavenet"
    config_class = WaveNetConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[WaveNetConfig] = None):
        super().__init__(data_spec)
        config = replace(config) if config is not None else WaveNetConfig()  # presets stay as they are
        self.config = config
        widths = (config.residual_channels, config.dilation_channels, config.skip_channels, config.head_channels)
        if min(widths) < 1 or config.layers < 1 or config.stacks < 1:
            raise DGMError(f"channel widths, layers and stacks must be >= 1, got {config}")
        if config.kernel_size < 2:
            raise DGMError(f"kernel_size must be >= 2 (a dilated conv needs a past tap), got {config.kernel_size}")
        # every position is scored: WaveNet reads sequences, not END-padded strings
        self.sequence = sequence_for(data_spec, "raster", "WaveNet")
        levels = self.sequence.levels
        self.embed = ShiftedEmbedding(levels, config.residual_channels)
        self.blocks = nn.ModuleList(
            GatedResidualBlock(
                config.residual_channels, config.dilation_channels, config.skip_channels, config.kernel_size, d
            )
            for d in dilation_schedule(config.layers, config.stacks)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Linear(config.skip_channels, config.head_channels),
            nn.ReLU(),
            nn.Linear(config.head_channels, levels),
        )

    @property
    def receptive_field(self) -> int:
        """``R``: the conditional of ``x_t`` reads ``x_{t-R}..x_{t-1}``."""
        return 1 + sum(block.receptive_field - 1 for block in self.blocks)

    def logits(self, features: Tensor) -> Tensor:
        """``[B, T, levels]`` logits of ``x_t | x_<t`` from the features ``[B, T, levels]``
        of ``x_0..x_{T-1}`` in one pass; position ``t`` reads ``features[:, t-R:t]`` only."""
        h = self.embed(features).transpose(1, 2)  # [B, residual, T]
        skips = 0
        for block in self.blocks:
            h, skip = block(h)
            skips = skips + skip
        return self.head(skips.transpose(1, 2))

    def conditional_log_probs(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return self.sequence.log_prob(self.logits(self.sequence.features(flat)), flat)

    # --- generation ---------------------------------------------------------------------------------
    def stepper(self, n: int, cached: bool = True) -> "Stepper":
        """A fresh generation state for ``n`` sequences: :class:`CachedStepper` (queues) or
        :class:`PrefixStepper` (the whole network over the prefix at every step)."""
        return CachedStepper(self, n) if cached else PrefixStepper(self, n)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        given: Optional[Tensor] = None,
        cached: bool = True,
        generator: Optional[torch.Generator] = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """``n`` ancestral samples ``[n, *event_shape]``, left to right.

        ``cached``: fast generation with per-layer queues (one step per layer per sample);
        ``False`` reruns the network over the prefix at every step. Both consume
        ``generator`` (on the model's device) in the same order and return the same samples.
        ``temperature`` divides the logits (0: the most likely value). ``given`` clamps a
        known prefix (NaN where to draw; see the base class)."""
        if temperature < 0:
            raise DGMError(f"temperature must be >= 0, got {temperature}")
        known = self.known_mask(given, n)
        ref = self.head[-1].weight
        x = torch.zeros(n, self.data_spec.dim, dtype=ref.dtype, device=ref.device)
        stepper = self.stepper(n, cached)
        for t in range(self.data_spec.dim):
            x[:, t] = self.sequence.draw(stepper.step(x, t), x, t, temperature, generator)
            self.clamp(x, given, known, t)
        return x.reshape((n,) + tuple(self.data_spec.event_shape))


class Stepper:
    """Generation state: ``step(x, t)`` returns the logits ``[n, levels]`` of ``x_t`` given
    the prefix ``x[:, :t]`` (``x[:, t:]`` is not read); steps must come for ``t = 0, 1, ..``."""

    def __init__(self, model: WaveNet, n: int):
        self.model, self.n = model, n

    def step(self, x: Tensor, t: int) -> Tensor:
        raise NotImplementedError


class PrefixStepper(Stepper):
    """The naive generator: the full network over ``x_0..x_t`` for every ``t``."""

    def step(self, x: Tensor, t: int) -> Tensor:
        return self.model.logits(self.model.sequence.features(x[:, : t + 1]))[:, t]


class CachedStepper(Stepper):
    """Fast generation: every layer's input queue holds what its dilated conv needs, so step
    ``t`` feeds only ``x_{t-1}`` through the network (one vector per layer)."""

    def __init__(self, model: WaveNet, n: int):
        super().__init__(model, n)
        ref = model.head[-1].weight
        self.queues = [block.new_queue(n, ref.dtype, ref.device) for block in model.blocks]

    def step(self, x: Tensor, t: int) -> Tensor:
        m = self.model
        previous = m.sequence.features(x[:, t - 1]) if t > 0 else None
        h = m.embed.at(previous, self.n)  # [n, residual]: START at t = 0
        skips = 0
        for block, queue in zip(m.blocks, self.queues):
            h, skip = block.step(h, queue)
            skips = skips + skip
        return m.head(skips)
