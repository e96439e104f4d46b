"""Masked convolutions for raster-order image models (PixelCNN and Gated PixelCNN), with
the single-position and single-row steps that cached incremental sampling needs.

Raster order on an ``H x W`` image: pixel ``(r, c)`` comes before ``(r', c')`` iff
``r < r'`` or ``r == r'`` and ``c < c'``. A convolution is *causal* when its output at
``(r, c)`` reads only inputs that come before ``(r, c)`` (mask ``A``, for the first layer,
which reads the image) or at ``(r, c)`` itself (mask ``B``, for the layers after it, whose
input at ``(r, c)`` already depends only on earlier pixels). Stacking one ``A`` layer and
any number of ``B`` layers keeps every output a function of strictly earlier pixels, which
is what makes ``p(x) = prod_i p(x_i | x_<i)`` normalized (van den Oord, Kalchbrenner and
Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML 2016, Section 3.5 and Figure 2).

Masks are buffers built by the pure function :func:`raster_mask` and applied functionally,
``conv2d(pad(x), mask * weight)``, never by editing weights (as ``MaskedLinear`` does).

Every conv here has an explicit zero padding ``(left, right, top, bottom)``: output
``(r, c)`` reads the padded input window ``rows r .. r + kh - 1, cols c .. c + kw - 1``,
i.e. input rows ``r - top .. r - top + kh - 1`` and columns ``c - left .. c - left + kw - 1``. That one
convention covers the square ``k x k`` convs of PixelCNN (``k // 2`` on every side) and the
vertical ``(k//2 + 1) x k`` and horizontal ``1 x (k//2 + 1)`` convs of the gated stacks.

Incremental evaluation (sampling): a conv's input map is kept as a zero-padded *cache*
(:meth:`MaskedConv2d.empty_cache`) filled position by position as the pixels it depends on
are drawn; :meth:`MaskedConv2d.at` then computes the output at one position from its window
(one matrix-vector product per datapoint) and :meth:`MaskedConv2d.row` one output row. Cache
entries not yet written are zero, and the mask gives them zero weight, so the result equals
the full convolution's at that position (up to float rounding: the sums run in another
order).

Conditioning (van den Oord et al., "Conditional Image Generation with PixelCNN Decoders",
NeurIPS 2016, eq. 4): a layer built with ``context_dim > 0`` adds a bias ``V h`` computed from
a global context vector ``h`` (a class, or a VAE's latent ``z``) to its pre-activations at
every position (:class:`ContextBias`). ``h`` is not an image input, so the bias leaves the
raster-order causality in ``x`` intact. With ``context_dim = 0`` (the default) no such layer
exists and the block is exactly the unconditional one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Padding = Tuple[int, int, int, int]  # (left, right, top, bottom), as F.pad takes it


def raster_mask(kernel: Tuple[int, int], center: Tuple[int, int], include_center: bool) -> Tensor:
    """``[kh, kw]`` 0/1 mask of a causal kernel whose tap ``center`` sits over the output
    position: 1 on the rows above ``center``, on the taps left of it in its row, and on
    ``center`` itself iff ``include_center`` (mask ``B``; mask ``A`` excludes it)."""
    kh, kw = kernel
    cr, cc = center
    rows = torch.arange(kh)[:, None]
    cols = torch.arange(kw)[None, :]
    before = (rows < cr) | ((rows == cr) & (cols < cc))
    if include_center:
        before = before | ((rows == cr) & (cols == cc))
    return before.float()


def gate(t: Tensor) -> Tensor:
    """Gated activation unit ``tanh(a) * sigmoid(b)`` with ``(a, b)`` the two halves of the
    channel axis (dim 1: ``[B, 2C, ...]`` maps and ``[n, 2C]`` vectors alike)."""
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(t: Tensor) -> Tensor:
    """``out[..., r, :] = t[..., r - 1, :]`` and zeros in row 0: a map whose row ``r`` holds
    only what ``t`` knew at row ``r - 1``."""
    return F.pad(t, (0, 0, 1, 0))[..., :-1, :]


class ContextBias(nn.Linear):
    """``h [n, context_dim] -> V h [n, channels]``: a per-channel bias, the same at every
    position, from a global context vector (no bias of its own: the conv it is added to has one)."""

    def __init__(self, context_dim: int, channels: int):
        super().__init__(context_dim, channels, bias=False)


def add_bias(t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``t + bias`` broadcast over the positions of a map ``[n, C, H, W]``, a row ``[n, C, W]``
    or a vector ``[n, C]``; ``t`` itself when ``bias`` is ``None``."""
    if bias is None:
        return t
    return t + bias.reshape(bias.shape + (1,) * (t.dim() - 2))


def context_bias(layer: Optional[ContextBias], context: Optional[Tensor]) -> Optional[Tensor]:
    """``layer(context)``, or ``None`` for an unconditional layer (``context`` is then ``None``)."""
    return None if layer is None else layer(context)


class MaskedConv2d(nn.Conv2d):
    """``conv2d(pad(x, padding), mask * weight) + bias`` with a ``[kh, kw]`` spatial mask
    (buffer) shared by all channel pairs (the images here have one channel, so a spatial
    mask is all causality needs)."""

    def __init__(self, in_channels: int, out_channels: int, mask: Tensor, padding: Padding, bias: bool = True):
        kh, kw = mask.shape
        super().__init__(in_channels, out_channels, (kh, kw), padding=0, bias=bias)
        self.register_buffer("mask", mask.float().clone())
        self.pad = tuple(padding)

    @classmethod
    def square(cls, in_channels: int, out_channels: int, kernel: int, mask_type: str) -> "MaskedConv2d":
        """PixelCNN's ``k x k`` conv with mask ``"A"`` or ``"B"`` and ``k // 2`` padding each side."""
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        p = kernel // 2
        mask = raster_mask((kernel, kernel), (p, p), include_center=mask_type == "B")
        return cls(in_channels, out_channels, mask, (p, p, p, p))

    def masked_weight(self) -> Tensor:
        return self.mask * self.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pad), self.masked_weight(), self.bias)

    # --- incremental evaluation --------------------------------------------------------------
    def empty_cache(self, n: int, height: int, width: int) -> Tensor:
        """A zero padded input map ``[n, in, top + H + bottom, left + W + right]``."""
        left, right, top, bottom = self.pad
        w = self.weight
        return w.new_zeros(n, self.in_channels, top + height + bottom, left + width + right)

    def write(self, cache: Tensor, r: int, c: int, value: Tensor) -> None:
        """Store the input ``[n, in]`` at image position ``(r, c)``."""
        cache[:, :, self.pad[2] + r, self.pad[0] + c] = value

    def write_row(self, cache: Tensor, r: int, value: Tensor) -> None:
        """Store the input row ``[n, in, W]`` at image row ``r``."""
        left, top = self.pad[0], self.pad[2]
        cache[:, :, top + r, left : left + value.shape[-1]] = value

    def at(self, cache: Tensor, r: int, c: int) -> Tensor:
        """The output ``[n, out]`` at ``(r, c)`` from its input window alone."""
        kh, kw = self.kernel_size
        window = cache[:, :, r : r + kh, c : c + kw].reshape(cache.shape[0], -1)
        return F.linear(window, self.masked_weight().reshape(self.out_channels, -1), self.bias)

    def row(self, cache: Tensor, r: int) -> Tensor:
        """The output row ``[n, out, W]`` at image row ``r`` from the rows it reads."""
        kh = self.kernel_size[0]
        return F.conv2d(cache[:, :, r : r + kh], self.masked_weight(), self.bias)[:, :, 0]


class Conv1x1(nn.Conv2d):
    """A ``1 x 1`` convolution (per-pixel linear map) that also applies to one position's
    channel vector ``[n, in]`` (``vector``), so incremental evaluation needs no cache for it."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def vector(self, v: Tensor) -> Tensor:
        return F.linear(v, self.weight[:, :, 0, 0], self.bias)


class ResidualBlock(nn.Module):
    """PixelCNN's residual block (Pixel RNN paper, Figure 5): ``2h`` channels in and out,
    ``a + W_3 relu(conv_B(relu(W_1 relu(a))))`` with ``W_1: 2h -> h`` and ``W_3: h -> 2h``
    ``1 x 1`` convs and ``conv_B`` a ``k x k`` mask-``B`` conv (``h -> h``). With
    ``context_dim > 0`` the context bias ``V h`` is added to ``conv_B``'s output; ``bias``
    (``[n, h]``, from :attr:`context`) is then an argument of ``forward`` and ``at``."""

    def __init__(self, channels: int, kernel: int, context_dim: int = 0):
        super().__init__()
        inner = max(1, channels // 2)
        self.reduce = Conv1x1(channels, inner)
        self.conv = MaskedConv2d.square(inner, inner, kernel, "B")
        self.expand = Conv1x1(inner, channels)
        self.context = ContextBias(context_dim, inner) if context_dim else None

    def forward(self, a: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        t = add_bias(self.conv(F.relu(self.reduce(F.relu(a)))), bias)
        return a + self.expand(F.relu(t))

    def at(self, cache: Tensor, a: Tensor, r: int, c: int, bias: Optional[Tensor] = None) -> Tensor:
        """The output ``[n, 2h]`` at ``(r, c)`` from its input ``a [n, 2h]`` there and the
        ``conv`` input ``cache`` (this call writes position ``(r, c)`` of it)."""
        self.conv.write(cache, r, c, F.relu(self.reduce.vector(F.relu(a))))
        return a + self.expand.vector(F.relu(add_bias(self.conv.at(cache, r, c), bias)))


class GatedBlock(nn.Module):
    """One layer of Gated PixelCNN (van den Oord et al., "Conditional Image Generation with
    PixelCNN Decoders", NeurIPS 2016, Figure 2), with ``p = k // 2``:

    * vertical stack: ``v' = conv_v(v)``, a ``(p + 1) x k`` conv over rows ``r - p .. r`` and
      columns ``c - p .. c + p`` (unmasked); ``v_out = tanh(v'_a) * sigmoid(v'_b)``;
    * horizontal stack: ``h' = conv_h(h) + W_link shift_down(v')``, with ``conv_h`` a
      ``1 x (p + 1)`` conv over columns ``c - p .. c`` (without ``c`` itself in the first
      layer: mask ``A``) and ``W_link`` a ``1 x 1`` conv; ``h_out = W_out gate(h') (+ h)``.

    The vertical stack sees whole rows up to the current one, so it never feeds the
    horizontal stack unshifted: ``shift_down`` makes row ``r`` of the horizontal stack read
    the vertical stack of row ``r - 1``. The two stacks together cover every pixel above
    and to the left within reach: no blind spot (PixelCNN's masked ``k x k`` convs miss a
    wedge to the upper right). ``residual`` adds ``h`` to ``h_out`` (all layers but the
    first, whose input is the image).

    Conditional layer (``context_dim > 0``; the paper's eq. 4, ``tanh(W_f * x + V_f h) *
    sigmoid(W_g * x + V_g h)``): biases ``V_v h`` and ``V_h h`` (``[n, 2C]`` each, from
    :attr:`context_v` and :attr:`context_h`) are added to ``v'`` and to ``h'``; ``biases`` is
    then the pair ``(V_v h, V_h h)`` in ``forward``, ``vertical_row`` and ``horizontal_at``.
    """

    def __init__(self, in_channels: int, channels: int, kernel: int, first: bool, context_dim: int = 0):
        super().__init__()
        p = kernel // 2
        self.residual = not first
        self.vertical = MaskedConv2d(in_channels, 2 * channels, torch.ones(p + 1, kernel), (p, p, p, 0))
        self.horizontal = MaskedConv2d(
            in_channels, 2 * channels, raster_mask((1, p + 1), (0, p), include_center=not first), (p, 0, 0, 0)
        )
        self.link = Conv1x1(2 * channels, 2 * channels)
        self.out = Conv1x1(channels, channels)
        self.context_v = ContextBias(context_dim, 2 * channels) if context_dim else None
        self.context_h = ContextBias(context_dim, 2 * channels) if context_dim else None

    def context_biases(self, context: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(V_v h, V_h h)``, or ``(None, None)`` for an unconditional layer."""
        return context_bias(self.context_v, context), context_bias(self.context_h, context)

    def forward(self, v: Tensor, h: Tensor, biases=(None, None)) -> Tuple[Tensor, Tensor]:
        vp = add_bias(self.vertical(v), biases[0])
        hp = add_bias(self.horizontal(h) + self.link(shift_down(vp)), biases[1])
        h_out = self.out(gate(hp))
        return gate(vp), h_out + h if self.residual else h_out

    def vertical_row(self, cache: Tensor, r: int, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(v_out row, W_link v' row)``, each ``[n, ., W]``, of image row ``r`` from the
        vertical ``cache`` (rows ``<= r`` written); ``bias``: ``V_v h``. The second is what the
        horizontal stack of row ``r + 1`` adds (the shift)."""
        vp = add_bias(self.vertical.row(cache, r), bias)
        link = F.conv2d(vp.unsqueeze(2), self.link.weight, self.link.bias)[:, :, 0]
        return gate(vp), link

    def link_of_nothing(self, n: int, width: int) -> Tensor:
        """What row 0 of the horizontal stack gets from above: ``W_link 0``, the bias."""
        return self.link.bias[None, :, None].expand(n, -1, width)

    def horizontal_at(
        self, cache: Tensor, link: Tensor, h: Tensor, r: int, c: int, bias: Optional[Tensor] = None
    ) -> Tensor:
        """``h_out [n, C]`` at ``(r, c)`` from the horizontal ``cache`` (positions before
        ``(r, c)`` in row ``r`` written, and ``(r, c)`` unless the layer is the first), the
        vertical contribution ``link [n, 2C]`` there, and ``h [n, .]``, the input at ``(r, c)``
        (used by the residual only); ``bias``: ``V_h h``."""
        out = self.out.vector(gate(add_bias(self.horizontal.at(cache, r, c) + link, bias)))
        return out + h if self.residual else out


class OutputHead(nn.Module):
    """The output layers of both models: ``W_2 relu(W_1 relu(a))`` with ``1 x 1`` convs
    (position-wise, so causal with any mask), giving the logits of each pixel's conditional."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.hidden = Conv1x1(in_channels, hidden)
        self.logits = Conv1x1(hidden, out_channels)

    def forward(self, a: Tensor) -> Tensor:
        return self.logits(F.relu(self.hidden(F.relu(a))))

    def vector(self, a: Tensor) -> Tensor:
        return self.logits.vector(F.relu(self.hidden.vector(F.relu(a))))
