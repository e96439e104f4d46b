"""Real NVP: real-valued non-volume preserving flows (Dinh, Sohl-Dickstein & Bengio 2016).

Affine coupling layers with alternating masks, a normalization layer after each::

    y = m * x + (1 - m) * (x * exp(s(m * x)) + t(m * x)),    log|det| = sum_{m_d = 0} s_d

``s`` and ``t`` come from one MLP on the kept coordinates (``m = 1``); the mask's parity
alternates so every coordinate is transformed. ``s`` is ``c * tanh(raw)`` with a learned
``c`` (``scale="tanh"``, the paper's stabilizer) or unbounded (``scale="exp"``).

Masks: ``checkerboard`` and ``channel`` on images (``channel`` on a one-channel image is the
squeezed 2x2-block mask, the even rows); ``alternating`` / ``half`` on vectors; ``"auto"``
is checkerboard for images and alternating otherwise. This is the single-scale version:
no squeezing, no factoring out, MLP conditioners instead of ResNets, as the MAF paper's
Real NVP baseline (Papamakarios et al. 2017, Sec. 4: 5 coupling layers, each conditioner
like the MADE, batch norm between layers). ``norm`` puts batch norm (``"batch"``, the
paper), data-initialized act-norm (``"act"``, Glow) or nothing after each coupling.

Comparison number (BENCHMARKS.md, MAF paper Table 2, MNIST in logit space): Real NVP(5)
reaches -1323.2 nats of average test log-likelihood.

Reference: L. Dinh, J. Sohl-Dickstein and S. Bengio, "Density estimation using Real NVP",
ICLR 2017, arXiv:1605.08803.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from models.base import DGMError
from models.flows.base import FlowModel, check_couplings
from models.flows.transforms import NORMALIZATIONS, AffineCoupling, Transform, coupling_mask
from models.registry import register_model

__all__ = ["RealNVP", "RealNVPConfig", "PRESETS"]


@dataclass
class RealNVPConfig:
    """``couplings`` affine layers with ``hidden``-unit MLP conditioners; ``mask``: auto,
    checkerboard, channel, alternating or half; ``norm``: batch, act or none."""

    couplings: int = 5
    hidden: Tuple[int, ...] = (1024,)
    activation: str = "relu"
    mask: str = "auto"
    scale: str = "tanh"
    norm: str = "batch"
    base: str = "gaussian"


PRESETS = {
    "mnist": RealNVPConfig(),  # Real NVP(5) of the MAF paper
    "mnist-cpu": RealNVPConfig(couplings=5, hidden=(512,)),  # ~0.08 s per batch of 100 on one CPU thread
    "toy": RealNVPConfig(couplings=8, hidden=(64, 64), norm="act"),
    "small": RealNVPConfig(couplings=4, hidden=(16, 16), norm="act"),
}


@register_model
class RealNVP(FlowModel):
    """Affine couplings with alternating masks and a normalization layer after each."""

    name = "realnvp"
    config_class = RealNVPConfig
    presets = PRESETS

    def __init__(self, data_spec, config: Optional[RealNVPConfig] = None):
        super().__init__(data_spec, config)

    def build_transforms(self, dim: int, image_shape) -> List[Transform]:
        c = self.config
        check_couplings(c.couplings, dim, "Real NVP")
        if c.norm not in (*NORMALIZATIONS, "none"):
            raise DGMError(f"unknown norm {c.norm!r}; choose from {', '.join(NORMALIZATIONS)} or none")
        mask = c.mask if c.mask != "auto" else ("checkerboard" if image_shape is not None else "alternating")
        layers: List[Transform] = []
        for k in range(c.couplings):
            layers.append(AffineCoupling(coupling_mask(mask, dim, image_shape, k % 2), c.hidden, c.activation, c.scale))
            if c.norm != "none":
                layers.append(NORMALIZATIONS[c.norm](dim))
        return layers
