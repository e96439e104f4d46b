"""Causal dilated 1-D convolutions and WaveNet's gated residual block, each with a one-step
form for cached (queue-based) generation.

A causal convolution of kernel size ``k`` and dilation ``d`` maps a sequence ``h_0..h_{T-1}``
(``[B, C, T]``) to

    y_t = b + sum_{j=0}^{k-1} W_j h_{t - (k-1-j) d},      h_s = 0 for s < 0,

so ``y_t`` reads ``h_t`` and ``k - 1`` earlier inputs spaced ``d`` apart, never a later one:
left zero padding of ``(k - 1) d`` followed by an ordinary (cross-correlating) ``conv1d``.
Stacking such layers with dilations ``1, 2, 4, ..., 2^(n-1)`` grows the receptive field
exponentially with depth, ``1 + (k - 1)(2^n - 1)``, at a cost linear in depth (van den Oord
et al. 2016, "WaveNet: a generative model for raw audio", Section 2.1 and Figure 3).

Cached generation (Paine et al. 2016, "Fast WaveNet generation algorithm"). Generating one
new position ``t`` needs, in every layer, only the layer's inputs at ``t, t - d, ..,
t - (k-1) d``. Each layer therefore keeps an :class:`InputQueue` of its last ``(k - 1) d``
inputs (a circular buffer, zeros at the start, matching the zero padding); a new position
costs one matrix-vector product per layer instead of a pass of the whole network over the
prefix. :meth:`CausalConv1d.step` and :meth:`GatedResidualBlock.step` are the one-step forms
and use the very same weights as ``forward``, so they agree with it to float rounding.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.nn.conv import gate


class InputQueue:
    """The last ``(k - 1) d`` inputs ``[n, C]`` of one causal layer, oldest evicted first.

    :meth:`push` takes ``h_t`` and returns the window ``[n, C, k]`` of
    ``h_{t-(k-1)d}, .., h_{t-d}, h_t`` (oldest first, as the kernel's taps are laid out);
    entries before position 0 are zeros. Stored as a circular buffer: ``h_s`` lives in slot
    ``s mod (k - 1) d``, so a push moves no data."""

    def __init__(self, n: int, channels: int, kernel_size: int, dilation: int, *, dtype, device):
        self.kernel_size, self.dilation = kernel_size, dilation
        self.length = (kernel_size - 1) * dilation
        self.buffer = torch.zeros(n, channels, self.length, dtype=dtype, device=device)
        self.t = 0  # the position the next push holds

    def push(self, h: Tensor) -> Tensor:
        t, d = self.t, self.dilation
        if self.length == 0:  # a 1x1 conv has no past
            window = h.unsqueeze(-1)
        else:
            k, length = self.kernel_size, self.length
            past = [self.buffer[:, :, (t - (k - 1 - j) * d) % length] for j in range(k - 1)]
            window = torch.stack(past + [h], dim=-1)  # a copy: the write below cannot change it
            self.buffer[:, :, t % length].copy_(h)  # overwrites h_{t - (k-1) d}, no longer needed
        self.t = t + 1
        return window


class CausalConv1d(nn.Conv1d):
    """``conv1d`` over ``[B, C, T]`` with left zero padding ``(k - 1) d``: output ``t`` reads
    inputs ``t - (k-1) d, .., t - d, t`` only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation, padding=0)

    @property
    def receptive_field(self) -> int:
        """How many consecutive inputs, ending at ``t``, output ``t`` reads: ``(k - 1) d + 1``."""
        return (self.kernel_size[0] - 1) * self.dilation[0] + 1

    def forward(self, h: Tensor) -> Tensor:
        return super().forward(F.pad(h, (self.receptive_field - 1, 0)))

    def new_queue(self, n: int, dtype: torch.dtype, device: torch.device) -> InputQueue:
        return InputQueue(n, self.in_channels, self.kernel_size[0], self.dilation[0], dtype=dtype, device=device)

    def step(self, h: Tensor, queue: InputQueue) -> Tensor:
        """``[n, out]``: output ``t`` from the input ``h_t`` ``[n, in]`` and the queue of the
        earlier inputs (``queue`` advances by one position)."""
        window = queue.push(h)  # [n, in, k], taps in the weight's order
        return F.linear(window.flatten(1), self.weight.flatten(1), self.bias)


def pointwise(h: Tensor, layer: nn.Linear) -> Tensor:
    """A 1x1 convolution of ``[B, C, T]`` with the weights of ``layer`` (``[n, C]`` vectors
    go through ``layer`` itself, so both forms share one set of weights)."""
    return F.conv1d(h, layer.weight.unsqueeze(-1), layer.bias)


class GatedResidualBlock(nn.Module):
    """One WaveNet layer (van den Oord et al. 2016, Section 2.3-2.4, Figure 4)::

        z = tanh(W_f * h) . sigmoid(W_g * h)      (* a causal dilated conv; W_f, W_g one conv
                                                   of 2 x dilation_channels outputs)
        h' = h + V_r z,   s = V_s z               (1x1 convs: residual and skip outputs)

    ``forward`` maps ``h [B, R, T]`` to ``(h' [B, R, T], s [B, S, T])``; output ``t`` reads
    ``h`` at ``t, t - d, .., t - (k-1) d`` only."""

    def __init__(self, residual: int, dilation_channels: int, skip: int, kernel_size: int, dilation: int):
        super().__init__()
        self.residual, self.skip = residual, skip
        self.conv = CausalConv1d(residual, 2 * dilation_channels, kernel_size, dilation)
        self.out = nn.Linear(dilation_channels, residual + skip)  # residual and skip 1x1 convs, stacked

    @property
    def receptive_field(self) -> int:
        return self.conv.receptive_field

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        res, skip = pointwise(gate(self.conv(h)), self.out).split([self.residual, self.skip], dim=1)
        return h + res, skip

    def new_queue(self, n: int, dtype: torch.dtype, device: torch.device) -> InputQueue:
        return self.conv.new_queue(n, dtype, device)

    def step(self, h: Tensor, queue: InputQueue) -> Tuple[Tensor, Tensor]:
        """``(h'_t [n, R], s_t [n, S])`` from ``h_t [n, R]`` and the layer's queue."""
        res, skip = self.out(gate(self.conv.step(h, queue))).split([self.residual, self.skip], dim=1)
        return h + res, skip


def dilation_schedule(layers: int, stacks: int) -> List[int]:
    """``[1, 2, .., 2^(layers-1)]`` repeated ``stacks`` times (WaveNet's schedule)."""
    return [2**i for i in range(layers)] * stacks
