"""NICE: Non-linear Independent Components Estimation (Dinh, Krueger & Bengio 2014).

Additive coupling layers alternate which half of the coordinates they shift, and a final
diagonal scaling gives the flow its only volume change::

    layer k:  y_A = x_A,   y_B = x_B + m_k(x_A)          (A, B swap roles every layer)
    last:     z = exp(s) * y
    log p(x) = sum_d log p_base(z_d) + sum_d s_d

Each ``m_k`` is an MLP (the paper: 5 hidden layers of 1000 ReLU units on MNIST). The base is
the standard logistic (the paper's choice for MNIST, with heavier tails than a Gaussian,
so its gradients are better behaved) or the standard Gaussian.

The paper's partition is odd/even coordinates (``mask="alternating"``); ``"half"`` and, for
images, ``"checkerboard"`` / ``"channel"`` are also available.

Comparison number (BENCHMARKS.md): NICE reaches 1980.50 nats on MNIST dequantized to the
pixel cube ``[0, 1]^D``. On ``mnist-logit`` the model lives in logit space; convert with
``log p_x = log p_y + logit_log_jacobian(y)`` (see :func:`models.flows.base.logit_bits_per_dim`).

Reference: L. Dinh, D. Krueger and Y. Bengio, "NICE: Non-linear independent components
estimation", ICLR 2015 workshop, arXiv:1410.8516.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from models.flows.base import FlowModel, check_couplings
from models.flows.transforms import AdditiveCoupling, DiagonalScaling, Transform, coupling_mask
from models.registry import register_model

__all__ = ["NICE", "NICEConfig", "PRESETS"]


@dataclass
class NICEConfig:
    """``couplings`` additive layers, each shifting half the coordinates by an MLP with
    ``hidden`` units of the other half; ``mask`` picks the partition (see ``transforms.MASKS``)."""

    couplings: int = 4
    hidden: Tuple[int, ...] = (1000, 1000, 1000, 1000, 1000)
    activation: str = "relu"
    mask: str = "alternating"
    base: str = "logistic"


PRESETS = {
    "mnist": NICEConfig(),  # the paper's MNIST architecture
    "mnist-cpu": NICEConfig(couplings=4, hidden=(256, 256)),
    "toy": NICEConfig(couplings=6, hidden=(64, 64), base="gaussian"),
    "small": NICEConfig(couplings=4, hidden=(16, 16)),
}


@register_model
class NICE(FlowModel):
    """Additive couplings with alternating partitions, then a diagonal scaling."""

    name = "nice"
    config_class = NICEConfig
    presets = PRESETS

    def __init__(self, data_spec, config: Optional[NICEConfig] = None):
        super().__init__(data_spec, config)

    def build_transforms(self, dim: int, image_shape) -> List[Transform]:
        c = self.config
        check_couplings(c.couplings, dim, "NICE")
        layers: List[Transform] = [
            AdditiveCoupling(coupling_mask(c.mask, dim, image_shape, k % 2), c.hidden, c.activation)
            for k in range(c.couplings)
        ]
        return layers + [DiagonalScaling(dim)]
