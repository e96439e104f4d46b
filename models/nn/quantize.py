"""Vector quantization: the discrete bottleneck of VQ-VAE (van den Oord, Vinyals and
Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017).

A codebook ``e_1 .. e_K`` of ``D``-vectors; every cell of an encoder map ``z_e [B, D, *grid]``
is replaced by its nearest code::

    k(z) = argmin_i ||z - e_i||^2,      z_q = e_{k(z_e)}

**Straight-through gradient** (Section 3.2 of the paper; Bengio et al. 2013): argmin has no
useful gradient, so the backward pass copies the gradient of the quantized output to the
encoder output, ``d L / d z_e := d L / d z_q``. :func:`straight_through` does this as an
autograd function whose forward returns ``z_q`` *exactly* (bit for bit a codebook member,
unlike ``z_e + sg(z_q - z_e)``, which rounds) and whose backward passes the incoming gradient
to ``z_e`` and none to the codebook.

**Losses** per datapoint (summed over the grid): the commitment loss
``||z_e - sg(z_q)||^2`` (weighted by ``beta`` in the model) keeps the encoder near its codes,
and, when the codebook is a parameter, the codebook loss ``||sg(z_e) - z_q||^2`` moves the
codes towards the encoder outputs.

**EMA codebook** (the paper's Appendix A.1; Razavi et al. 2019): instead of the codebook
loss, each code is the running mean of the encoder outputs assigned to it. With ``n_i`` the
number of cells assigned to code ``i`` in the batch and ``s_i`` the sum of their vectors::

    N_i <- gamma N_i + (1 - gamma) n_i
    m_i <- gamma m_i + (1 - gamma) s_i
    e_i  = m_i / N~_i,     N~_i = (N_i + eps) / (n + K eps) * n,   n = sum_i N_i

``N~`` is Laplace smoothing of the counts (no division by zero for an unused code; the
total ``n`` is unchanged). The buffers start at ``N_i = 1`` and ``m_i = e_i``, so an unused
code stays at its initial value (instead of being divided by ``eps`` and pushed far away
as with ``N_i = 0``). Optionally a code whose count ``N_i`` falls below
``dead_code_threshold`` is restarted at a random encoder output of the batch (``N_i = 1``).
The codebook and both running sums are buffers, so checkpoints carry them; no gradient
reaches the codebook.

**Usage.** :func:`perplexity` ``exp(H(p))`` of the batch's code frequencies ``p``: ``K``
when every code is used equally, 1 when a single code is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn

from models.base import DGMError

__all__ = ["Quantized", "VectorQuantizer", "UniformCodebook", "straight_through", "perplexity"]


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_e: Tensor, z_q: Tensor) -> Tensor:
        return z_q.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def straight_through(z_e: Tensor, z_q: Tensor) -> Tensor:
    """``z_q`` in the forward pass; the gradient of the output goes to ``z_e`` unchanged
    (and none to ``z_q``)."""
    if z_e.shape != z_q.shape:
        raise DGMError(f"straight_through: z_e {list(z_e.shape)} and z_q {list(z_q.shape)} differ in shape")
    return _StraightThrough.apply(z_e, z_q)


def perplexity(indices: Tensor, num_codes: int) -> Tensor:
    """``exp(-sum_i p_i log p_i)`` of the code frequencies ``p`` in ``indices`` (any shape)."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum()
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()
    return entropy.exp().float()


@dataclass
class Quantized:
    """Output of :class:`VectorQuantizer` for ``z_e [B, D, *grid]``."""

    z_q: Tensor  # [B, D, *grid]: codebook vectors, straight-through to z_e
    indices: Tensor  # [B, *grid] int64
    commitment: Tensor  # [B]: ||z_e - sg(z_q)||^2 summed over the grid
    codebook_loss: Tensor  # [B]: ||sg(z_e) - z_q||^2 (no gradient with an EMA codebook)
    perplexity: Tensor  # scalar: code usage in this batch


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a ``[K, D]`` codebook, learned by EMA (default) or by
    gradient through the codebook loss (``ema=False``). See the module docstring."""

    def __init__(
        self,
        num_codes: int,
        dim: int,
        ema: bool = True,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise DGMError(f"a codebook needs num_codes >= 2 and dim >= 1, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise DGMError(f"the EMA decay must be in [0, 1), got {decay}")
        if epsilon <= 0:
            raise DGMError(f"the Laplace smoothing epsilon must be > 0, got {epsilon}")
        self.num_codes, self.dim, self.ema = num_codes, dim, ema
        self.decay, self.epsilon, self.dead_code_threshold = decay, epsilon, dead_code_threshold
        init = torch.randn(num_codes, dim)
        if ema:
            self.register_buffer("codebook", init.clone())
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code ``[N]`` for each row of ``flat [N, D]``."""
        e = self.codebook.detach()
        d2 = (flat.detach() ** 2).sum(1, keepdim=True) - 2 * flat.detach() @ e.t() + (e**2).sum(1)
        return d2.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of ``indices [B, *grid]`` as a map ``[B, D, *grid]``."""
        vectors = self.codebook[indices]  # [B, *grid, D]
        return vectors.movedim(-1, 1)

    def forward(self, z_e: Tensor, update: bool = False) -> Quantized:
        """Quantize ``z_e [B, D, *grid]``; ``update`` applies one EMA step with this batch
        (after the codes are chosen, so ``z_q`` holds the codebook the batch saw)."""
        if z_e.dim() < 2 or z_e.shape[1] != self.dim:
            raise DGMError(f"the quantizer expects [B, {self.dim}, ...] maps, got {list(z_e.shape)}")
        flat = z_e.movedim(1, -1).reshape(-1, self.dim)
        idx = self.nearest(flat)
        indices = idx.reshape((z_e.shape[0],) + tuple(z_e.shape[2:]))
        z_q = self.lookup(indices)
        cells = tuple(range(1, z_e.dim()))
        out = Quantized(
            z_q=straight_through(z_e, z_q.detach()),
            indices=indices,
            commitment=((z_e - z_q.detach()) ** 2).sum(cells),
            codebook_loss=((z_e.detach() - z_q) ** 2).sum(cells),
            perplexity=perplexity(indices, self.num_codes),
        )
        if update:
            if not self.ema:
                raise DGMError("EMA updates need a quantizer built with ema=True")
            self.ema_update(flat.detach(), idx)
        return out

    @torch.no_grad()
    def ema_update(self, flat: Tensor, idx: Tensor) -> None:
        """One EMA step with the batch ``flat [N, D]`` assigned to codes ``idx [N]``."""
        one_hot = nn.functional.one_hot(idx, self.num_codes).to(flat.dtype)  # [N, K]
        gamma = self.decay
        self.ema_count.mul_(gamma).add_(one_hot.sum(0), alpha=1 - gamma)
        self.ema_sum.mul_(gamma).add_(one_hot.t() @ flat, alpha=1 - gamma)
        if self.dead_code_threshold > 0:
            dead = self.ema_count < self.dead_code_threshold
            if dead.any():
                pick = torch.randint(flat.shape[0], (int(dead.sum()),), device=flat.device)
                self.ema_sum[dead] = flat[pick]
                self.ema_count[dead] = 1.0
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.epsilon) / (n + self.num_codes * self.epsilon) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])


class UniformCodebook(dist.TorchDistribution):
    """The uniform prior over codebook maps: each of the ``h x w`` cells holds one of the
    ``K`` codes, independently and uniformly, as a ``[D, h, w]`` event.

    ``log_prob`` is ``-h w log K``, the log-mass of any map of codebook members; it does not
    test membership (values come from the VQ-VAE guide, which only produces members of the
    codebook as it was when the guide ran: an EMA step may move the codebook right after).
    ``sample`` draws uniform code indices and looks them up.
    """

    arg_constraints = {}
    has_rsample = False
    support = constraints.independent(constraints.real, 3)

    def __init__(self, codebook: Tensor, grid: Tuple[int, int], batch_shape=torch.Size()):
        self.codebook = codebook
        self.grid = tuple(grid)
        k, d = codebook.shape
        super().__init__(torch.Size(batch_shape), torch.Size((d,) + self.grid), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return UniformCodebook(self.codebook, self.grid, batch_shape)

    @property
    def log_mass(self) -> float:
        return -math.prod(self.grid) * math.log(self.codebook.shape[0])

    def log_prob(self, value: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(value.shape[: value.dim() - 3], self.batch_shape)
        return value.new_full(shape, self.log_mass)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        idx = torch.randint(self.codebook.shape[0], shape + self.grid, device=self.codebook.device)
        return self.codebook.detach()[idx].movedim(-1, len(shape))
