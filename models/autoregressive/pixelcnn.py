"""PixelCNN (van den Oord, Kalchbrenner and Kavukcuoglu, "Pixel Recurrent Neural Networks",
ICML 2016, Section 3.5): a stack of masked convolutions over a single-channel image, in
raster order::

    p(x) = prod_{r, c} p(x_{r,c} | x_{<(r,c)}),    logits = head(blocks_B(conv_A(x)))

``conv_A`` is a ``7 x 7`` convolution whose mask keeps only the taps strictly before the
centre in raster order (rows above; the left part of the centre row); the residual blocks
(``2h -> h`` ``1 x 1``, ``h -> h`` ``3 x 3`` mask ``B``, which also keeps the centre, ``h -> 2h``
``1 x 1``) and the ``1 x 1`` output layers preserve that, so output ``(r, c)`` depends only on
earlier pixels and one forward pass gives every conditional (teacher forcing). Binary pixels
get one Bernoulli logit each, ``K``-level pixels ``K`` softmax logits; the network reads the
bit, or the one-hot code, as its input channels.

**Blind spot.** The receptive field of a stack of masked convs is the Minkowski sum of their
masks' supports, not the causal part of the nominal ``(7 + 2L) x (7 + 2L)`` square: a mask-B
``3 x 3`` step reaches one column further right only by going one row up, so the pixels in
a wedge to the upper right (e.g. one row up, more than 3 columns right) never reach the
output although they precede it (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders", Figure 1). ``tests/test_pixelcnn.py`` measures it through the
gradients; Gated PixelCNN (``gated_pixelcnn.py``) removes it.

**Sampling.** Ancestral, one pixel at a time in raster order. ``cached=True`` (default)
evaluates each layer at the one new position only, from per-layer caches of the inputs of
the ``k x k`` convs (:mod:`models.nn.conv`): a pixel costs one step per layer rather than a
forward pass over the image, ``O(HW)`` times less work. ``cached=False`` runs the whole
network for every pixel (the reference). Both draw one uniform ``u`` per pixel, in raster
order, from the same stream, and invert the conditional's CDF at ``u`` (binary:
``x = [u < sigmoid(logit)]``), so they return the same samples for the same generator.
``given`` (NaN where to draw) clamps known pixels: exact conditional samples when the known
pixels precede the unknown ones (the top rows of the image).

**Conditioning.** Built with ``context_dim = L > 0`` (the decoder of a VAE,
``models/latent/ar_vae.py``), the model takes a context vector ``h [B, L]`` in every density
and sampling call and models ``p(x | h) = prod p(x_{r,c} | x_{<(r,c)}, h)``: the mask-A conv and
every residual block's mask-B conv get a per-channel bias ``V h`` (the conditional PixelCNN of
van den Oord et al. 2016, eq. 4, on this architecture). ``context_dim = 0`` (the default)
builds no such layer: the model is then exactly the unconditional one.

Published test NLL on binarized MNIST: 81.30 nats (static binarization); 81.45 with dynamic
binarization (pytorch-generative, a per-epoch average).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from models.autoregressive.base import AutoregressiveModel
from models.base import DataSpec, DGMError
from models.nn.conv import ContextBias, MaskedConv2d, OutputHead, ResidualBlock, add_bias, context_bias
from models.nn.units import units_for
from models.registry import register_model

__all__ = ["PixelCNN", "PixelCNNConfig", "PRESETS", "RasterImageModel", "raster_shape", "inverse_cdf"]


@dataclass
class PixelCNNConfig:
    """``channels``: the residual stream (``2h`` in the paper; the blocks' ``3 x 3`` convs have
    ``channels // 2``); ``num_blocks`` residual blocks; ``first_kernel``: the mask-A conv;
    ``kernel``: the blocks' mask-B convs; ``head_channels``: the ``1 x 1`` output layer."""

    channels: int = 32
    num_blocks: int = 4
    first_kernel: int = 7
    kernel: int = 3
    head_channels: int = 32


PRESETS = {
    # Pixel RNN's PixelCNN layout at the size pytorch-generative trains on MNIST (81.45 nats,
    # dynamic binarization): 15 residual blocks of 128 channels, 32-unit output layers.
    "mnist": PixelCNNConfig(channels=128, num_blocks=15, first_kernel=7, kernel=3, head_channels=32),
    # about 0.25 s per step of 100 MNIST digits on one CPU thread: an epoch in 2-3 minutes
    "cpu": PixelCNNConfig(channels=32, num_blocks=5, first_kernel=7, kernel=3, head_channels=32),
    "small": PixelCNNConfig(channels=8, num_blocks=2, first_kernel=5, kernel=3, head_channels=16),
}


def raster_shape(spec: DataSpec, model: str) -> Tuple[int, int]:
    """``(H, W)`` of a single-channel image: event shape ``(H, W)``, or ``(H * W,)`` (as MNIST
    is stored) with ``image_shape`` ``(H, W)`` or ``(1, H, W)``."""
    event = tuple(spec.event_shape)
    if len(event) == 2:
        return event
    image = tuple(spec.image_shape or ())
    if len(image) == 3 and image[0] == 1:
        image = image[1:]
    if len(event) == 1 and len(image) == 2 and image[0] * image[1] == event[0]:
        return image
    raise DGMError(
        f"{model} models single-channel images in raster order: it needs event shape (H, W), or (H*W,) "
        f"with image_shape (H, W); got event shape {event} and image shape {spec.image_shape}"
    )


def inverse_cdf(logits: Tensor, u: Tensor) -> Tensor:
    """The level whose CDF interval holds ``u`` (one uniform per row): ``[u < sigmoid(l)]``
    for Bernoulli logits ``[n]``, ``#{k : F(k) <= u}`` for softmax logits ``[n, K]``
    (``F`` the CDF). Exactly distributed as the conditional, and a pure function of ``u``,
    so two evaluation paths with the same ``u`` draw the same sample."""
    if logits.dim() == 1:
        return (u < torch.sigmoid(logits)).to(u.dtype)
    cdf = torch.softmax(logits, -1).cumsum(-1)
    return (cdf <= u[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1).to(u.dtype)


class _FullPasses:
    """Reference sampler state: the input maps, and a full forward pass per pixel."""

    def __init__(self, model: "RasterImageModel", n: int, context: Optional[Tensor] = None):
        self.model = model
        self.context = context
        ref = model.reference_parameter()
        self.maps = ref.new_zeros(n, model.units.levels, model.height, model.width)

    def logits_at(self, r: int, c: int) -> Tensor:
        return self.model.logit_maps(self.maps, self.context)[:, :, r, c]

    def observe(self, r: int, c: int, features: Tensor) -> None:
        self.maps[:, :, r, c] = features


class RasterImageModel(AutoregressiveModel):
    """Shared by PixelCNN and Gated PixelCNN: a single-channel image in raster order, a
    network ``logit_maps([B, L, H, W] inputs) -> [B, L, H, W] logits`` (``L`` = 1 for bits,
    ``K`` for levels) that is causal in raster order, and the sampling driver.

    Subclasses implement ``logit_maps`` and ``incremental(n, context)``, an object with
    ``logits_at(r, c) -> [n, L]`` (called once per pixel in raster order, after every
    earlier pixel was observed) and ``observe(r, c, features [n, L])``.

    ``context_dim > 0`` makes the model conditional: every density and sampling call then
    takes ``context`` ``[B, context_dim]`` (see the module docstring)."""

    def __init__(self, data_spec: DataSpec, label: str, context_dim: int = 0):
        super().__init__(data_spec)
        self.units = units_for(data_spec, label)
        self.height, self.width = raster_shape(data_spec, label)
        if context_dim < 0:
            raise DGMError(f"{label}: context_dim must be >= 0 (0: unconditional), got {context_dim}")
        self.context_dim = context_dim

    def reference_parameter(self) -> Tensor:
        return next(self.parameters())

    # --- density -------------------------------------------------------------------------------
    def logit_maps(self, maps: Tensor, context: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def input_maps(self, x: Tensor) -> Tensor:
        """``[B, L, H, W]``: the bits (``L = 1``) or one-hot levels the network reads."""
        flat = x.reshape(x.shape[0], -1)
        return self.units.features(flat).transpose(1, 2).reshape(x.shape[0], -1, self.height, self.width)

    def logits(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Conditional logits ``[B, D]`` (bits) or ``[B, D, K]`` (levels), raster order."""
        self.check_context(context, x.shape[0])
        maps = self.logit_maps(self.input_maps(x), context)
        return self.units.natural(maps.flatten(2).transpose(1, 2))

    def conditional_log_probs(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return self.units.log_prob(self.logits(flat, context), flat)

    def log_prob(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Exact ``log p(x)`` (``log p(x | context)`` for a conditional model) per datapoint."""
        return self.conditional_log_probs(x, context).sum(-1)

    # --- sampling ------------------------------------------------------------------------------
    def incremental(self, n: int, context: Optional[Tensor] = None):
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        given: Optional[Tensor] = None,
        cached: bool = True,
        generator: Optional[torch.Generator] = None,
        context: Optional[Tensor] = None,
    ) -> Tensor:
        """``[n, *event_shape]`` ancestral samples in raster order (see the module docstring):
        ``cached`` one layer step per pixel, else a full pass per pixel; ``given`` (NaN where
        to draw) clamps known pixels; ``generator`` (on the model's device) makes the draw
        reproducible, and the same for both paths; ``context`` ``[n, context_dim]``: the
        conditioning of a conditional model, one row per sample."""
        known = self.known_mask(given, n)
        self.check_context(context, n)
        ref = self.reference_parameter()
        dim = self.height * self.width
        u = torch.rand(n, dim, generator=generator, dtype=ref.dtype, device=ref.device)
        x = ref.new_zeros(n, dim)
        state = self.incremental(n, context) if cached else _FullPasses(self, n, context)
        for pos in range(dim):
            r, c = divmod(pos, self.width)
            x[:, pos] = inverse_cdf(self.units.natural(state.logits_at(r, c)), u[:, pos])
            self.clamp(x, given, known, pos)
            state.observe(r, c, self.units.features(x[:, pos]))
        return x.reshape((n,) + tuple(self.data_spec.event_shape))


def check_kernels(label: str, **kernels: int) -> None:
    for key, k in kernels.items():
        if k < 1 or k % 2 == 0:
            raise DGMError(f"{label}: {key} must be an odd number >= 1 (a kernel centred on its pixel), got {k}")


def check_positive(label: str, **sizes: int) -> None:
    for key, v in sizes.items():
        if v < 1:
            raise DGMError(f"{label}: {key} must be >= 1, got {v}")


class _PixelCNNSteps:
    """Cached sampler state: the padded input map of every ``k x k`` conv, filled as pixels
    are drawn; a pixel costs one step of each layer at its position."""

    def __init__(self, net: "PixelCNN", n: int, context: Optional[Tensor] = None):
        self.net = net
        h, w = net.height, net.width
        self.input_cache = net.input_conv.empty_cache(n, h, w)
        self.block_caches = [block.conv.empty_cache(n, h, w) for block in net.blocks]
        self.input_bias, self.block_biases = net.context_biases(context)  # computed once

    def logits_at(self, r: int, c: int) -> Tensor:
        a = add_bias(self.net.input_conv.at(self.input_cache, r, c), self.input_bias)
        for block, cache, bias in zip(self.net.blocks, self.block_caches, self.block_biases):
            a = block.at(cache, a, r, c, bias)
        return self.net.head.vector(a)

    def observe(self, r: int, c: int, features: Tensor) -> None:
        self.net.input_conv.write(self.input_cache, r, c, features)


@register_model
class PixelCNN(RasterImageModel):
    """PixelCNN: a mask-A conv and residual mask-B blocks over binary or K-level images.

    See the module docstring."""

    name = "pixelcnn"
    config_class = PixelCNNConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[PixelCNNConfig] = None, context_dim: int = 0):
        super().__init__(data_spec, "PixelCNN", context_dim)
        config = replace(config) if config is not None else PixelCNNConfig()
        self.config = config
        check_kernels("PixelCNN", first_kernel=config.first_kernel, kernel=config.kernel)
        if config.first_kernel < 3:
            raise DGMError("PixelCNN: first_kernel must be >= 3 (a 1 x 1 mask-A conv sees no pixel at all)")
        check_positive("PixelCNN", channels=config.channels, head_channels=config.head_channels)
        if config.num_blocks < 0:
            raise DGMError(f"PixelCNN: num_blocks must be >= 0, got {config.num_blocks}")
        levels = self.units.levels
        self.input_conv = MaskedConv2d.square(levels, config.channels, config.first_kernel, "A")
        self.blocks = nn.ModuleList(
            ResidualBlock(config.channels, config.kernel, context_dim) for _ in range(config.num_blocks)
        )
        self.head = OutputHead(config.channels, config.head_channels, levels)
        self.input_context = ContextBias(context_dim, config.channels) if context_dim else None

    def context_biases(self, context: Optional[Tensor]):
        """``(V h of the mask-A conv, [V h of each block])``, ``None`` s when unconditional."""
        return context_bias(self.input_context, context), [context_bias(b.context, context) for b in self.blocks]

    def logit_maps(self, maps: Tensor, context: Optional[Tensor] = None) -> Tensor:
        input_bias, block_biases = self.context_biases(context)
        a = add_bias(self.input_conv(maps), input_bias)
        for block, bias in zip(self.blocks, block_biases):
            a = block(a, bias)
        return self.head(a)

    def incremental(self, n: int, context: Optional[Tensor] = None) -> _PixelCNNSteps:
        return _PixelCNNSteps(self, n, context)
