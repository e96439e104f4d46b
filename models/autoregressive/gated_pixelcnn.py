"""Gated PixelCNN (van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves and Kavukcuoglu,
"Conditional Image Generation with PixelCNN Decoders", NeurIPS 2016, Section 2 and Figure 2)
over single-channel images in raster order.

Each layer (:class:`models.nn.conv.GatedBlock`) has two stacks:

* the **vertical** stack, ``(k//2 + 1) x k`` convs that see every pixel in the rows above and
  in the current row within reach, left and right;
* the **horizontal** stack, ``1 x (k//2 + 1)`` convs over the current row up to the current
  pixel (excluding it in the first layer), plus ``W_link`` applied to the vertical stack's
  pre-activations *shifted down one row*, so row ``r`` only ever sees rows ``< r`` from above;

both with gated units ``y = tanh(W_f * x) * sigmoid(W_g * x)`` and a residual connection in
the horizontal stack. The ``1 x 1`` output layers read the horizontal stack. Unlike
PixelCNN's masked ``k x k`` convs, the two stacks cover the whole causal neighbourhood: with
``R = first_kernel // 2 + num_layers * (kernel // 2)``, pixel ``(r, c)`` depends on every pixel
in rows ``r - 1 - R .. r - 1``, columns ``c - R .. c + R``, and in row ``r``, columns
``c - R .. c - 1`` (no blind spot; ``tests/test_pixelcnn.py`` checks this exact set through
the gradients).

**Cached sampling.** The vertical stack at row ``r - 1`` depends only on rows ``<= r - 1``, so
it is computed once per row, for all columns at once, when row ``r - 1`` is complete; each
pixel then costs one step of every horizontal layer at its position. ``cached=False`` runs
the whole network for every pixel; both paths use the same uniforms and return the same
samples (see :class:`models.autoregressive.pixelcnn.RasterImageModel`).

**Conditioning** (the paper's conditional PixelCNN, eq. 4): built with ``context_dim = L > 0``
the model takes a context ``h [B, L]`` (a VAE's latent: ``models/latent/ar_vae.py``) and every
gated layer adds ``V h`` to the pre-activations of both stacks,
``tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h)``. ``context_dim = 0`` (the default) builds
no such layer: the model is then exactly the unconditional one.

Published test NLL on binarized MNIST: 81.50 nats (dynamic binarization, pytorch-generative,
a per-epoch average); the paper reports CIFAR-10 and ImageNet only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import Tensor, nn

from models.autoregressive.pixelcnn import RasterImageModel, check_kernels, check_positive
from models.base import DataSpec, DGMError
from models.nn.conv import GatedBlock, OutputHead
from models.registry import register_model

__all__ = ["GatedPixelCNN", "GatedPixelCNNConfig", "PRESETS"]


@dataclass
class GatedPixelCNNConfig:
    """``channels``: both stacks' width; ``first_kernel``: the first gated layer (its
    horizontal conv excludes the current pixel, mask A); ``num_layers`` residual gated layers
    after it with ``kernel``; ``head_channels``: the ``1 x 1`` output layer."""

    channels: int = 32
    num_layers: int = 4
    first_kernel: int = 7
    kernel: int = 3
    head_channels: int = 32


PRESETS = {
    # the size pytorch-generative trains on MNIST (81.50 nats, dynamic binarization): a 7 x 7
    # first layer, 10 gated layers of 128 channels, 32-unit output layers
    "mnist": GatedPixelCNNConfig(channels=128, num_layers=10, first_kernel=7, kernel=3, head_channels=32),
    # about 0.2 s per step of 100 MNIST digits on one CPU thread: an epoch in 2-3 minutes
    "cpu": GatedPixelCNNConfig(channels=16, num_layers=3, first_kernel=7, kernel=3, head_channels=32),
    "small": GatedPixelCNNConfig(channels=8, num_layers=2, first_kernel=5, kernel=3, head_channels=16),
}


class _GatedSteps:
    """Cached sampler state: padded input maps of every layer's vertical and horizontal
    convs, and each layer's vertical contribution to the current row (``W_link`` of the
    vertical pre-activations of the row above)."""

    def __init__(self, net: "GatedPixelCNN", n: int, context: Optional[Tensor] = None):
        self.blocks = list(net.blocks)
        self.biases = [b.context_biases(context) for b in self.blocks]  # computed once
        self.head = net.head
        h, w = net.height, net.width
        self.vertical = [b.vertical.empty_cache(n, h, w) for b in self.blocks]
        self.horizontal = [b.horizontal.empty_cache(n, h, w) for b in self.blocks]
        self.links = [b.link_of_nothing(n, w) for b in self.blocks]  # row 0: nothing above

    def _vertical_row(self, r: int) -> None:
        """Run the vertical stack on the completed row ``r``: the links of row ``r + 1``."""
        for i, block in enumerate(self.blocks):
            v_out, self.links[i] = block.vertical_row(self.vertical[i], r, self.biases[i][0])
            if i + 1 < len(self.blocks):
                self.blocks[i + 1].vertical.write_row(self.vertical[i + 1], r, v_out)

    def logits_at(self, r: int, c: int) -> Tensor:
        if c == 0 and r > 0:
            self._vertical_row(r - 1)
        h = None  # the first layer has no residual: its input is the pixel being drawn
        for i, block in enumerate(self.blocks):
            h = block.horizontal_at(self.horizontal[i], self.links[i][:, :, c], h, r, c, self.biases[i][1])
            if i + 1 < len(self.blocks):
                self.blocks[i + 1].horizontal.write(self.horizontal[i + 1], r, c, h)
        return self.head.vector(h)

    def observe(self, r: int, c: int, features: Tensor) -> None:
        first = self.blocks[0]
        first.vertical.write(self.vertical[0], r, c, features)
        first.horizontal.write(self.horizontal[0], r, c, features)


@register_model
class GatedPixelCNN(RasterImageModel):
    """Gated PixelCNN: vertical and horizontal gated stacks, no blind spot (binary or K-level images).

    See the module docstring; ``context_dim > 0`` makes it conditional on a context vector."""

    name = "gated_pixelcnn"
    config_class = GatedPixelCNNConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[GatedPixelCNNConfig] = None, context_dim: int = 0):
        super().__init__(data_spec, "Gated PixelCNN", context_dim)
        config = replace(config) if config is not None else GatedPixelCNNConfig()
        self.config = config
        check_kernels("Gated PixelCNN", first_kernel=config.first_kernel, kernel=config.kernel)
        if config.first_kernel < 3:
            raise DGMError("Gated PixelCNN: first_kernel must be >= 3 (its mask-A row conv would see no pixel)")
        check_positive("Gated PixelCNN", channels=config.channels, head_channels=config.head_channels)
        if config.num_layers < 0:
            raise DGMError(f"Gated PixelCNN: num_layers must be >= 0, got {config.num_layers}")
        c = config.channels
        first = GatedBlock(self.units.levels, c, config.first_kernel, first=True, context_dim=context_dim)
        rest = [GatedBlock(c, c, config.kernel, first=False, context_dim=context_dim) for _ in range(config.num_layers)]
        self.blocks = nn.ModuleList([first, *rest])
        self.head = OutputHead(c, config.head_channels, self.units.levels)

    def logit_maps(self, maps: Tensor, context: Optional[Tensor] = None) -> Tensor:
        v = h = maps
        for block in self.blocks:
            v, h = block(v, h, block.context_biases(context))
        return self.head(h)

    def incremental(self, n: int, context: Optional[Tensor] = None) -> _GatedSteps:
        return _GatedSteps(self, n, context)
