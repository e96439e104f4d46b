"""The base class of the suite's finite mixtures ``z ~ Categorical(pi)``, ``x | z ~ p_z(x)``:
the Pyro program with ``z`` marked for enumeration, an optional amortized guide, exact
``log p(x)`` and posterior, and (MAP-)EM. ``bernoulli_mixture.py`` and
``gaussian_mixture.py`` give the components; the mathematics is in their docstrings.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.base import DataSpec, DGMError, GenerativeModel
from models.nn import MLP

__all__ = ["MixtureModel"]


class MixtureModel(GenerativeModel):
    """Base class of finite mixtures ``z ~ Categorical(pi)``, ``x | z ~ p_z(x)``.

    Subclasses define the components through three hooks: ``component(z)`` (the
    distribution of ``x`` given component indices ``z`` of any shape, as used in the Pyro
    program), ``component_log_prob(x) -> [B, K]`` (every component at once) and
    ``m_step(x, r, counts)`` (the closed-form update of the component parameters from
    responsibilities ``r [N, K]``); ``log_prior_components`` for MAP-EM is optional.
    """

    has_exact_log_prob = True

    def __init__(
        self,
        data_spec: DataSpec,
        num_components: int,
        weight_pseudocount: float,
        encoder: bool,
        encoder_hidden: Tuple[int, ...],
    ):
        super().__init__(data_spec)
        if num_components < 1:
            raise DGMError(f"num_components must be >= 1, got {num_components}")
        if weight_pseudocount < 0:
            raise DGMError(f"weight_pseudocount must be >= 0, got {weight_pseudocount}")
        self.num_components = num_components
        self.weight_pseudocount = weight_pseudocount
        self.weight_logits = nn.Parameter(torch.zeros(num_components))
        self.encoder = MLP(data_spec.dim, encoder_hidden, num_components, "relu") if encoder else None
        if self.encoder is not None:
            nn.init.zeros_(self.encoder[-1].weight)  # start from q(z | x) = uniform
            nn.init.zeros_(self.encoder[-1].bias)

    # --- hooks ---------------------------------------------------------------------------------
    def component(self, z: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def component_log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def m_step(self, x: Tensor, r: Tensor, counts: Tensor) -> None:
        raise NotImplementedError

    def log_prior_components(self) -> Tensor:
        return self.weight_logits.new_zeros(())

    # --- the Pyro program ----------------------------------------------------------------------
    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", dist.Categorical(logits=self.weight_logits), infer={"enumerate": "parallel"})
            pyro.sample("x", self.component(z), obs=x)

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        """``q(z | x) = Categorical(softmax(encoder(x)))``; empty when ``encoder`` is off, so
        ``z`` is then enumerated in the model (``elbo-enum``) or drawn from the prior."""
        if self.encoder is None:
            return
        logits = self.encoder(self._flat(x))
        with self.data_plate(x, idx, size):
            pyro.sample("z", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    # --- exact quantities ----------------------------------------------------------------------
    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).to(self.weight_logits.dtype)

    @property
    def log_weights(self) -> Tensor:
        return F.log_softmax(self.weight_logits, -1)

    def joint_log_prob(self, x: Tensor) -> Tensor:
        """``log pi_k + log p_k(x)``, ``[B, K]``."""
        return self.log_weights + self.component_log_prob(self._flat(x))

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x) = logsumexp_k [log pi_k + log p_k(x)]``."""
        return torch.logsumexp(self.joint_log_prob(x), dim=-1)

    def posterior(self, x: Tensor) -> dist.Categorical:
        """The exact ``p(z | x)`` (responsibilities), batch shape ``[B]``."""
        return dist.Categorical(logits=self.joint_log_prob(x))

    def log_prior(self) -> Tensor:
        """Log density of the parameters under the smoothing priors MAP-EM maximises (up to
        a constant): ``alpha sum_k log pi_k`` plus the components' term."""
        return self.weight_pseudocount * self.log_weights.sum() + self.log_prior_components()

    @torch.no_grad()
    def em_update(self, x: Tensor) -> None:
        """One (MAP-)EM step in place: responsibilities, then closed-form weights and
        components."""
        x = self._flat(x)
        r = self.posterior(x).probs  # [N, K]
        counts = r.sum(0)
        alpha = self.weight_pseudocount
        weights = (counts + alpha) / (x.shape[0] + self.num_components * alpha)
        self.weight_logits.copy_(weights.clamp_min(torch.finfo(weights.dtype).tiny).log())
        self.m_step(x, r, counts)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        z = dist.Categorical(logits=self.weight_logits).sample((n,))
        return self.component(z).sample().reshape(n, *self.data_spec.event_shape)
