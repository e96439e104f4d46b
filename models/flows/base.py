"""Normalizing flows as density models: a base distribution pushed through invertible layers.

A flow model holds layers ``f_1 .. f_K`` (see :mod:`models.flows.transforms`; each maps data
towards noise with its log-determinant) and a factorized base density ``p_base``::

    z = f_K o ... o f_1 (x),    log p(x) = sum_d log p_base(z_d) + sum_k log|det J_{f_k}|

``log_prob`` is exact, so the Pyro program is one observed site (the distribution of
:mod:`models.autoregressive.base`, which needs only ``data_spec``, ``log_prob`` and
``sample``), the guide is empty and every objective's bound equals ``log p(x)``. Sampling
draws ``z ~ p_base`` and runs the layers' inverses in reverse order.

Subclasses (NICE, Real NVP, MAF) implement one hook, :meth:`FlowModel.build_transforms`.

``mnist-logit`` data live in logit space; :func:`logit_bits_per_dim` turns a logit-space
``log p(y)`` into bits per dimension of the 8-bit pixels, the unit of the Real NVP / Glow
papers' tables (the MAF paper reports the logit-space nats themselves).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar, List, Optional, Tuple

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.autoregressive.base import AutoregressiveDistribution
from models.base import DataSpec, DGMError, GenerativeModel
from models.flows.logit import LOGIT_LAMBDA, logit_log_jacobian
from models.flows.transforms import BatchNormFlow, Transform

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StandardGaussian:
    """``N(0, I)``: ``log p(z) = sum_d -z_d^2 / 2 - log(2 pi) / 2``."""

    def log_prob(self, z: Tensor) -> Tensor:
        return (-0.5 * z**2 - _HALF_LOG_2PI).sum(-1)

    def sample(self, shape, generator=None, dtype=None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)


class StandardLogistic:
    """The standard logistic (NICE's prior): ``log p(z) = sum_d -softplus(z_d) - softplus(-z_d)``;
    sampled as ``log u - log(1 - u)``, ``u ~ U(0, 1)``."""

    def log_prob(self, z: Tensor) -> Tensor:
        return -(F.softplus(z) + F.softplus(-z)).sum(-1)

    def sample(self, shape, generator=None, dtype=None, device=None) -> Tensor:
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        tiny = torch.finfo(u.dtype).tiny
        return torch.log(u.clamp_min(tiny)) - torch.log1p(-u)


BASES = {"gaussian": StandardGaussian, "logistic": StandardLogistic}


@contextmanager
def _eval(module: nn.Module):
    """Eval mode for the block, then the module's previous mode."""
    mode = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(mode)


class FlowModel(GenerativeModel):
    """A base density and a stack of invertible layers. Subclasses implement
    :meth:`build_transforms`; their config dataclass has a ``base`` field."""

    has_exact_log_prob: ClassVar[bool] = True
    fully_observed: ClassVar[bool] = True

    def __init__(self, data_spec: DataSpec, config=None):
        super().__init__(data_spec)
        if data_spec.support != "real":
            raise DGMError(
                f"{type(self).__name__} is a density on real vectors, not on {data_spec.describe()}; "
                "use real-valued data (e.g. --data mnist-logit, moons) or a discrete model such as MADE or NADE"
            )
        self.config = replace(config) if config is not None else self.config_class()
        if self.config.base not in BASES:
            raise DGMError(f"unknown base distribution {self.config.base!r}; choose from {', '.join(BASES)}")
        self.base = BASES[self.config.base]()
        self.transforms = nn.ModuleList(self.build_transforms(data_spec.dim, data_spec.image_shape))

    def build_transforms(self, dim: int, image_shape: Optional[Tuple[int, ...]]) -> List[Transform]:
        """The layers ``f_1 .. f_K`` in the density direction (data first)."""
        raise NotImplementedError

    # --- the Pyro program -----------------------------------------------------------------------
    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            pyro.sample("x", AutoregressiveDistribution(self), obs=x)

    # --- densities and samples -----------------------------------------------------------------
    def to_noise(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(z, sum_k log|det J_k|)`` for a batch ``[B, *event_shape]``; ``z`` is ``[B, D]``."""
        z = x.reshape(x.shape[0], -1)
        total = z.new_zeros(z.shape[0])
        for t in self.transforms:
            z, logdet = t(z)
            total = total + logdet
        return z, total

    def to_data(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """``(x [B, *event_shape], sum_k log|det J_k^{-1}|)`` for noise ``z [B, D]``."""
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z)
            total = total + logdet
        return z.reshape((z.shape[0],) + tuple(self.data_spec.event_shape)), total

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` per datapoint, in nats (change of variables)."""
        z, logdet = self.to_noise(x)
        return self.base.log_prob(z) + logdet

    @torch.no_grad()
    def set_batch_norm_statistics(self, x: Tensor, chunk: int = 5000) -> None:
        """Set every batch-norm layer's eval-mode statistics to the exact mean and variance of
        its inputs over ``x`` (the training set), layer by layer, in one pass: the MAF paper's
        protocol after training. Running averages lag behind the changing layers below them,
        which can cost a deep flow on MNIST tens of nats (see BatchNormFlow)."""
        h = x.reshape(x.shape[0], -1)
        with _eval(self):
            for layer in self.transforms:
                if isinstance(layer, BatchNormFlow):
                    layer.running_mean.copy_(h.mean(0))
                    layer.running_var.copy_(h.var(0, unbiased=False))
                h = torch.cat([layer(c)[0] for c in h.split(chunk)])

    def after_fit(self, train: Tensor) -> None:
        """The MAF paper's protocol: batch-norm statistics from the whole training set."""
        if any(isinstance(layer, BatchNormFlow) for layer in self.transforms):
            ref = next(self.parameters())
            self.set_batch_norm_statistics(train.to(device=ref.device, dtype=ref.dtype))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples ``[n, *event_shape]``: ``z ~ p_base`` through the inverse layers."""
        ref = next(self.parameters())
        z = self.base.sample((n, self.data_spec.dim), generator=generator, dtype=ref.dtype, device=ref.device)
        return self.to_data(z)[0]


def check_couplings(couplings: int, dim: int, name: str) -> None:
    """Refuse a coupling flow that has no layers or nothing to split."""
    if couplings < 1:
        raise DGMError(f"couplings must be >= 1, got {couplings}")
    if dim < 2:
        raise DGMError(f"a coupling layer splits the coordinates in two: {name} needs data of dimension >= 2")


def logit_bits_per_dim(log_p_y: Tensor, y: Tensor, lam: Optional[float] = None) -> Tensor:
    """Bits per dimension of 8-bit pixels from a logit-space log-density, per datapoint.

    ``y = logit(lam + (1 - 2 lam) x)`` with ``x = (pixel + u) / 256`` (``mnist-logit``). By
    the change of variables ``log p_x(x) = log p_y(y) + logit_log_jacobian(y)`` on ``[0, 1]^D``;
    the density of ``256 x`` on ``[0, 256)^D`` is ``p_x / 256^D``, and its negative
    log-density in bits per dimension is the usual dequantized bound on the discrete model's
    code length (Theis et al. 2016; Real NVP and Glow report this number)::

        bits/dim = -(log p_x(x) - D log 256) / (D log 2)
    """
    d = y[0].numel()
    log_p_x = log_p_y + logit_log_jacobian(y, LOGIT_LAMBDA if lam is None else lam)
    return -(log_p_x - d * math.log(256)) / (d * math.log(2))
