"""Neural autoregressive distribution estimator (Larochelle & Murray 2011).

NADE is an autoregressive model whose conditionals share one hidden layer with tied
weights. In the natural order of the flattened datapoint, with ``H`` hidden units::

    a_1 = c,   a_{i+1} = a_i + W_{:, i} x_i          (so a_i = c + W_{:, <i} x_<i)
    h_i = sigmoid(a_i)
    binary:      p(x_i = 1 | x_<i) = sigmoid(b_i + V_i . h_i)
    categorical: p(x_i = k | x_<i) = softmax_k(b_i + V_i h_i)

Parameters for binary data: ``W [H, D]``, ``c [H]``, ``V [D, H]``, ``b [D]``. For
categorical data with ``K`` levels, each dimension reads and writes a one-hot vector
``e(x_i)`` in ``R^K``: the output weights are ``V [D, K, H]``, ``b [D, K]``, and the input
weights ``W [H, D, K]``, so ``a_{i+1} = a_i + W_{:, i, :} e(x_i) = a_i + W_{:, i, x_i}``
(one column per level: the next hidden state sees the level itself, not its magnitude).
Both cases are one computation once the binary parameters are read as ``K = 1`` with
``e(x_i) = x_i``; the support only decides the input encoding, the output log-probability
and the sampler (a small per-support object, not string switches).

Training and evaluation compute all ``D`` conditionals in one pass of O(B D H K) that
holds one ``[D, B, H]`` tensor, the hidden states ``h`` (a custom autograd function,
:class:`TiedSigmoidLayer`): the pre-activations are the running sum ``a_{i+1} = a_i +
W_{:, i} e(x_i)`` written once into ``h`` and squashed there, and the logits are one batched
matmul over the dimensions. Its backward allocates one more ``[D, B, H]`` tensor: ``dL/da``,
turned in place into the reverse cumulative sum that ``W`` and the input features need. The
plain autograd of ``cumsum`` + ``cat`` + two einsums held about ten such tensors a step
(with a flip and zero-filled slice gradients), and on a CPU every fresh ``[B, D, H]`` tensor
costs page faults as well as its own pass (``python -m benchmarks --only nade`` measures both
formulations in one process). On a CPU the running sums are a loop over ``D`` slices of
``[B, H]`` (each add stays in cache, faster than ``torch.cumsum`` along a middle axis);
elsewhere they are ``cumsum`` calls. Without a graph (evaluation) no ``[D, B, H]`` tensor is
kept: each slice of ``h`` is read out as it is made. Sampling follows the recursion: ``D``
sequential steps, each O(H K) on the running pre-activation ``a``.

Published test NLL on statically binarized MNIST: 88.33 nats for NADE with a fixed pixel
order (Uria et al. 2016; ``H = 500`` is the ``mnist`` preset); an FVSBN gets 97.45
(Gan et al. 2015).
Real-valued data needs RNADE (Uria, Murray & Larochelle 2013), which is not this model.

Reference: H. Larochelle and I. Murray, "The neural autoregressive distribution
estimator", AISTATS 2011.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.autoregressive.base import AutoregressiveModel
from models.base import DataSpec, DGMError
from models.nn.units import units_for
from models.registry import register_model

__all__ = ["NADE", "NADEConfig", "PRESETS", "TiedSigmoidLayer"]


@dataclass
class NADEConfig:
    """``hidden``: the number ``H`` of hidden units shared by all conditionals."""

    hidden: int = 500


PRESETS = {
    "mnist": NADEConfig(hidden=500),
    "small": NADEConfig(hidden=64),
}


@register_model
class NADE(AutoregressiveModel):
    """NADE for binary or categorical data, in the natural order of the flattened datapoint."""

    name = "nade"
    config_class = NADEConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[NADEConfig] = None):
        super().__init__(data_spec)
        self.config = config = config or NADEConfig()
        self.units = units_for(data_spec, "NADE")
        if config.hidden < 1:
            raise DGMError(f"hidden must be >= 1, got {config.hidden}")
        d, h = data_spec.dim, config.hidden
        # binary: W [H, D], V [D, H], b [D]; categorical: W [H, D, K], V [D, K, H], b [D, K]
        level = () if data_spec.support == "binary" else (self.units.levels,)
        self.W = nn.Parameter(torch.empty((h, d) + level).uniform_(-1, 1) / math.sqrt(d))
        self.c = nn.Parameter(torch.zeros(h))
        self.V = nn.Parameter(torch.empty((d,) + level + (h,)).uniform_(-1, 1) / math.sqrt(h))
        self.b = nn.Parameter(torch.zeros((d,) + level))

    # Views with an explicit level axis (K = 1 for binary data): W [D, K, H], V [D, K, H], b [D, K].
    def _input_weights(self) -> Tensor:
        return self.W.reshape(self.config.hidden, self.data_spec.dim, -1).permute(1, 2, 0)

    def _output_weights(self) -> Tensor:
        return self.V.reshape(self.data_spec.dim, -1, self.config.hidden)

    def _output_bias(self) -> Tensor:
        return self.b.reshape(self.data_spec.dim, -1)

    def input_features(self, x: Tensor) -> Tensor:
        """``[B, D, K]``: what each dimension feeds the hidden layer (``x_i`` itself for
        binary data, ``K = 1``; the one-hot of the level for categorical data)."""
        return self.units.features(x.reshape(x.shape[0], -1))

    def conditional_logits(self, features: Tensor) -> Tensor:
        """``[B, D, K]`` output logits of every conditional from input features ``[B, D, K]``
        (differentiable in the features, so a relaxed one-hot may be passed)."""
        args = (features, self._input_weights(), self.c, self._output_weights(), self._output_bias())
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            return TiedSigmoidLayer.apply(*args)
        with torch.no_grad():
            return tied_sigmoid_logits(*args)

    def conditional_log_probs(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        logits = self.conditional_logits(self.units.features(flat))
        return self.units.log_prob(self.units.natural(logits), flat)

    @torch.no_grad()
    def sample(self, n: int, given: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` ancestral samples ``[n, *event_shape]``: ``D`` steps of O(H K) each, carrying
        the pre-activation ``a`` forward instead of recomputing it. ``given`` clamps known
        positions (NaN elsewhere; the natural order, see the base class)."""
        known = self.known_mask(given, n)
        w_in, w_out, bias = self._input_weights(), self._output_weights(), self._output_bias()
        a = self.c.expand(n, -1)
        x = self.c.new_empty(n, self.data_spec.dim)
        for i in range(self.data_spec.dim):
            logits = torch.sigmoid(a) @ w_out[i].T + bias[i]  # [n, K]
            x[:, i] = self.units.sample(self.units.natural(logits), generator)
            self.clamp(x, given, known, i)
            a = a + self.units.features(x[:, i]) @ w_in[i]
        return x.reshape((n,) + tuple(self.data_spec.event_shape))


# --- the shared hidden layer of all D conditionals, and its gradient ---------------------------------
# Shapes: features f [B, D, K], input weights w_in [D, K, H], c [H], output weights w_out [D, K, H],
# output bias [D, K]; hidden states are kept dimension-major, [D, B, H], so that each slice h[i] is one
# contiguous [B, H] block and the per-dimension matmuls are one bmm with the dimension as its batch.


def _sequential(t: Tensor) -> bool:
    """Running sums as a loop over ``[B, H]`` slices (CPU) or as ``cumsum`` kernels (elsewhere)."""
    return t.device.type == "cpu"


def _add_contribution_(a: Tensor, f_i: Tensor, w_i: Tensor) -> None:
    """``a += e(x_i) W_{:, i}`` for one dimension: ``a [B, H]``, ``f_i [B, K]``, ``w_i [K, H]``."""
    if f_i.shape[-1] == 1:
        a.addcmul_(f_i, w_i)  # an outer product: cheaper than a matmul of inner size 1
    else:
        a.addmm_(f_i, w_i)


def hidden_states(f: Tensor, w_in: Tensor, c: Tensor, sequential: bool) -> Tensor:
    """``h [D, B, H]``, ``h_i = sigmoid(c + sum_{j < i} e(x_j) W_{:, j})``, written into one fresh
    tensor (the only ``[D, B, H]`` one the forward pass makes)."""
    batch, dim, _ = f.shape
    ft = f.transpose(0, 1)
    h = f.new_empty(dim, batch, c.shape[0])
    if sequential:
        a = c.expand(batch, -1).clone()  # the running pre-activation, [B, H]
        for i in range(dim):
            torch.sigmoid(a, out=h[i])
            if i + 1 < dim:
                _add_contribution_(a, ft[i], w_in[i])
        return h
    h[0] = c
    torch.bmm(ft[:-1], w_in[:-1], out=h[1:])  # h[i + 1] = e(x_i) W_{:, i}
    return h.cumsum_(0).sigmoid_()


def tied_sigmoid_logits(f: Tensor, w_in: Tensor, c: Tensor, w_out: Tensor, bias: Tensor) -> Tensor:
    """``[B, D, K]`` logits without a graph: each ``h_i`` is read out as soon as it is made, so
    nothing of size ``[D, B, H]`` is held (evaluation at any batch size)."""
    batch, dim, k = f.shape
    w_in, w_out = w_in.contiguous(), w_out.contiguous()
    ft = f.transpose(0, 1)
    logits = f.new_empty(dim, batch, k)
    a = c.expand(batch, -1).clone()
    h = torch.empty_like(a)
    for i in range(dim):
        torch.sigmoid(a, out=h)
        torch.addmm(bias[i], h, w_out[i].T, out=logits[i])
        if i + 1 < dim:
            _add_contribution_(a, ft[i], w_in[i])
    return logits.transpose(0, 1)


class TiedSigmoidLayer(torch.autograd.Function):
    """``logits [B, D, K] = b_i + W'_i sigmoid(c + sum_{j < i} W_{:, j} e(x_j))`` for every ``i``,
    from ``(f, w_in, c, w_out, bias)`` (shapes above), with a hand-written backward that keeps one
    ``[D, B, H]`` tensor (``h``) from the forward pass and makes one more (``dL/da``)::

        dL/dh_i = g_i W'_i                          (g = dL/dlogits, [B, K] per dimension)
        dL/da_i = dL/dh_i * h_i * (1 - h_i)
        r_j = sum_{i > j} dL/da_i                   (a reverse cumulative sum)
        dL/dW_{:, j} = e(x_j)^T r_j,  dL/dc = sum_i dL/da_i,  dL/de(x_j) = r_j W_{:, j}^T
        dL/dW'_i = g_i^T h_i,  dL/db_i = sum_b g_i

    Double backward is not supported (``once_differentiable``)."""

    @staticmethod
    def forward(ctx, f: Tensor, w_in: Tensor, c: Tensor, w_out: Tensor, bias: Tensor) -> Tensor:
        w_in, w_out = w_in.contiguous(), w_out.contiguous()
        h = hidden_states(f, w_in, c, _sequential(f))
        logits = torch.baddbmm(bias.unsqueeze(1), h, w_out.transpose(1, 2))  # [D, B, K]
        ctx.save_for_backward(f, w_in, w_out, h)
        return logits.transpose(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        f, w_in, w_out, h = ctx.saved_tensors
        need_f, need_in, need_c, need_out, need_bias = ctx.needs_input_grad
        g = grad.transpose(0, 1)  # [D, B, K]
        g_out = torch.bmm(g.transpose(1, 2), h) if need_out else None
        g_bias = g.sum(1) if need_bias else None
        if not (need_f or need_in or need_c):
            return None, None, None, g_out, g_bias
        r = torch.bmm(g, w_out)  # dL/dh, the backward pass's one [D, B, H] tensor
        r.mul_(h).addcmul_(r, h, value=-1)  # dL/da = dL/dh h (1 - h), in place
        _reverse_cumsum_(r)  # r[i] = sum_{i' >= i} dL/da_i', so dL/d(contribution j) = r[j + 1]
        g_c = r[0].sum(0) if need_c else None
        ft = f.transpose(0, 1)
        g_in = g_f = None
        if need_in:
            g_in = torch.zeros_like(w_in)
            torch.bmm(ft[:-1].transpose(1, 2), r[1:], out=g_in[:-1])
        if need_f:
            g_f = f.new_zeros(f.shape[1], f.shape[0], f.shape[2])
            torch.bmm(r[1:], w_in[:-1].transpose(1, 2), out=g_f[:-1])
            g_f = g_f.transpose(0, 1)
        return g_f, g_in, g_c, g_out, g_bias


def _reverse_cumsum_(r: Tensor) -> None:
    """``r[i] <- sum_{i' >= i} r[i']`` along the first axis, in place."""
    if _sequential(r):
        for i in range(r.shape[0] - 2, -1, -1):
            r[i] += r[i + 1]
    else:
        r.copy_(r.flip(0).cumsum(0).flip(0))
