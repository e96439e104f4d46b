"""Expectation-maximisation for models with a closed-form update.

It knows nothing about particular models: any model exposing ``em_update(x)`` (one EM
step, in place) and ``log_prob(x)`` (exact ``log p(x)`` per datapoint) can be fitted.
EM never decreases the log-likelihood (Dempster, Laird & Rubin, 1977), so the recorded
history is a check on the model's update as much as a record of progress.

Two ways in: ``run_em`` (a plain loop on a fixed tensor, for tests and notebooks) and
``ClosedFormEM``, the ``--objective em`` of the runner: there each training step is one EM
step on the whole training set (the runner gives a closed-form objective the full data as
one batch), so validation, early stopping, checkpoints, metrics and evaluation are the
runner's as for every other inference choice. With dynamic binarization each step sees a
fresh binarization of the training images (EM on a resampled dataset).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inference.config import ObjectiveConfig
from inference.objective import OBJECTIVES, Objective
from models.base import DataSpec, DGMError, GenerativeModel

__all__ = ["ClosedFormEM", "run_em"]


def _mean_log_prob(model, x: Tensor) -> float:
    with torch.no_grad():
        return float(model.log_prob(x).mean())


def run_em(
    model,
    x: Tensor,
    steps: int = 1000,
    tol: float = 1e-8,
    callback: Optional[Callable[[int, float], None]] = None,
    progress: Optional[bool] = None,
) -> List[float]:
    """Run up to ``steps`` EM steps on the full dataset ``x``.

    Returns the mean log-likelihood per datapoint (nats), ``history[0]`` before any step
    and ``history[t]`` after step ``t``. Stops early once a step improves the mean
    log-likelihood by less than ``tol``. ``callback(step, mean_log_lik)`` is called after
    every step. ``progress`` shows a tqdm bar (``None``: only on a terminal).
    """
    update = getattr(model, "em_update", None)
    if not callable(update):
        raise DGMError(
            f"{type(model).__name__} has no closed-form EM step (em_update); "
            "fit it with gradient-based inference instead"
        )
    if steps < 0:
        raise DGMError(f"steps must be >= 0, got {steps}")
    if isinstance(model, GenerativeModel):
        model.check_data(x)

    history = [_mean_log_prob(model, x)]
    bar = tqdm(range(1, steps + 1), desc="EM", disable=None if progress is None else not progress)
    for step in bar:
        update(x)
        value = _mean_log_prob(model, x)
        history.append(value)
        bar.set_postfix(log_lik=f"{value:.6f}")
        if callback is not None:
            callback(step, value)
        if value - history[-2] < tol:
            break
    bar.close()
    return history


def _em_update(model) -> Callable[[Tensor], None]:
    update = getattr(model, "em_update", None)
    if not callable(update):
        raise DGMError(
            f"{type(model).__name__} has no closed-form EM step (em_update); "
            "fit it with gradient-based inference instead (--objective elbo, elbo-enum, ...)"
        )
    return update


@OBJECTIVES.register("em", "closed-form EM steps on the whole training set (models with em_update: mixtures, PPCA)")
class ClosedFormEM(Objective):
    """``--objective em``: one closed-form EM step per training step, on the whole batch.

    It declares ``full_batch`` (the runner passes the whole training set as the batch) and
    ``uses_guide = False`` (only the model is fitted), and takes its steps in
    ``train_step`` instead of differentiating a loss. The reported bound is the exact
    ``log p(x)`` after the step (EM's objective itself, not a lower bound)."""

    full_batch = True
    uses_guide = False
    supports_schedule = False

    def __init__(self, config: Optional[ObjectiveConfig] = None, data_spec: Optional[DataSpec] = None):
        pass

    def check(self, model: GenerativeModel) -> None:
        _em_update(model)
        if not model.has_exact_log_prob:
            raise DGMError(f"{type(model).__name__} has no exact log p(x) to monitor EM with")

    def train_step(
        self, model: GenerativeModel, guide, x: Tensor, idx, size, optimizer, conditions
    ) -> Dict[str, Tensor]:
        with torch.no_grad():
            _em_update(model)(x)
            log_px = model.log_prob(x).mean()
        return {"bound": log_px, "loss": -log_px}

    def validation_bound(self, model: GenerativeModel, guide, x: Tensor, **conditions) -> Tensor:
        """Exact ``log p(x)`` per datapoint."""
        with torch.no_grad():
            return model.log_prob(x)
