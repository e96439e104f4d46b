"""Approximation and amortization gaps (Cremer, Li and Duvenaud 2018, "Inference
suboptimality in variational autoencoders").

For each datapoint ``x`` of a trained model and its guide::

    log p(x) >= ELBO(q*) >= ELBO(q_enc)
    approximation gap = log p(x) - ELBO(q*)      (the family's limit)
    amortization gap  = ELBO(q*) - ELBO(q_enc)   (the encoder's shortfall)

* ``log p(x)``: exact where the model has it (PPCA, mixtures); else AIS
  (``ESTIMATORS["ais"]``, prior start) where every latent site is continuous; else importance
  sampling with the guide as proposal at large K (a lower bound: the approximation gap is then
  under-stated by IS's own gap).
* ``q*``: the best per-datapoint q of the mean-field Gaussian family (the diagonal encoder's),
  fitted with the local guide (:func:`inference.runner.fit_local_guide`) on these datapoints
  with the model frozen, started at the guide's per-datapoint means and scales (a flow's
  matched by sample moments), ``REFIT_PARTICLES`` samples per gradient and a cosine-decayed
  rate, so that it ends no worse than the encoder. For a guide of a richer family (a flow)
  ``q*`` is still the Gaussian one: its "amortization gap" can then be negative, by what the
  flow gains over the Gaussian family.
* ``ELBO(q)``: the mean of ``log p(x, z) - log q(z | x)`` over ``elbo_samples`` samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch
from torch import Tensor

from inference.config import EvalConfig, TrainConfig
from inference.device import eval_mode
from inference.estimators import ESTIMATORS, estimate_dataset, make_estimator
from inference.objectives import ELBO
from models.base import DGMError, GenerativeModel

__all__ = ["Gaps", "inference_gaps", "log_px_estimator", "elbo_per_datapoint"]

REFIT_PARTICLES = 10  # samples per gradient of the q* fit: single-sample steps leave it short of the encoder


@dataclass
class Gaps:
    """Per-datapoint ``log_px``, ``elbo_best`` (q*) and ``elbo_encoder`` ``[n]``, in nats."""

    log_px: Tensor
    elbo_best: Tensor
    elbo_encoder: Tensor
    log_px_method: str
    settings: Dict

    @property
    def approximation(self) -> Tensor:
        return self.log_px - self.elbo_best

    @property
    def amortization(self) -> Tensor:
        return self.elbo_best - self.elbo_encoder

    def summary(self) -> Dict:
        """Means and standard errors over the datapoints."""
        out = {"n": int(self.log_px.shape[0]), "log_px_method": self.log_px_method, **self.settings}
        for name in ("log_px", "elbo_best", "elbo_encoder", "approximation", "amortization"):
            v = getattr(self, name).double()
            out[name] = float(v.mean())
            out[f"{name}_stderr"] = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
        return out

    def to_json(self) -> Dict:
        return {
            **self.summary(),
            "per_datapoint": {
                name: [round(float(v), 5) for v in getattr(self, name)]
                for name in ("log_px", "elbo_best", "elbo_encoder", "approximation", "amortization")
            },
        }


def log_px_estimator(model: GenerativeModel, config: EvalConfig) -> EvalConfig:
    """``config`` with the estimator the gaps use for ``model``: exact, else AIS where it
    applies, else IS."""
    if model.has_exact_log_prob:
        return replace(config, estimator="exact")
    try:
        ESTIMATORS.get("ais").factory(replace(config, estimator="ais")).check(model)
        return replace(config, estimator="ais")
    except DGMError:
        return replace(config, estimator="is")


def elbo_per_datapoint(model: GenerativeModel, guide, x: Tensor, samples: int, batch_size: int = 100) -> Tensor:
    """The ELBO of ``guide`` per datapoint ``[n]`` with ``samples`` samples each (no
    gradients); ``guide`` is called with the rows' indices ``0..n-1`` of ``x``."""
    n, out = x.shape[0], []
    objective = ELBO(samples)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size), device=x.device)
            out.append(objective.bound(model.model, guide, x[idx], idx, n).double().cpu())
    return torch.cat(out)


def inference_gaps(
    model: GenerativeModel,
    guide,
    x: Tensor,
    *,
    log_px: Optional[EvalConfig] = None,
    elbo_samples: int = 100,
    refit_epochs: int = 200,
    refit_lr: float = 0.05,
    train: Optional[TrainConfig] = None,
    progress: bool = False,
) -> Gaps:
    """The gaps of ``model`` with ``guide`` on the datapoints ``x`` (see the module
    docstring). ``log_px`` sets the log p(x) estimator's settings (its ``estimator`` is
    chosen here); ``refit_epochs`` / ``refit_lr`` the fit of q* (full-batch Adam steps on
    ``x`` with ``train``'s other settings)."""
    from inference.runner import fit_local_guide  # the runner imports guides: import at use

    if model.uses_labels:
        raise DGMError(f"{type(model).__name__} takes class labels; the gaps are for unconditional models")
    config = log_px_estimator(model, log_px or EvalConfig(k=5000))
    n = x.shape[0]
    train = replace(train or TrainConfig(), progress=False, lr=refit_lr, batch_size=n)
    with eval_mode(model, guide):
        guide = guide.for_data(model, x, train=train)
        estimator = make_estimator(config, model)
        est = estimate_dataset(
            model, x, guide=guide, batch_size=config.batch_size, progress=progress, estimator=estimator
        )
        encoder = elbo_per_datapoint(model, guide, x, elbo_samples, config.batch_size)
        options = {"local_lr": refit_lr, "local_steps": 0}
        best = fit_local_guide(
            model, x, REFIT_PARTICLES, train, epochs=refit_epochs, init_from=guide, guide_options=options
        )
        elbo_best = elbo_per_datapoint(model, best, x, elbo_samples, config.batch_size)
    settings = {
        "estimator_settings": estimator.describe_settings(),
        "elbo_samples": elbo_samples,
        "refit_epochs": refit_epochs,
        "refit_lr": refit_lr,
    }
    return Gaps(est.log_px.double(), elbo_best, encoder, config.estimator, settings)
