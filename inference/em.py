"""A generic expectation-maximisation loop.

It knows nothing about particular models: any model exposing ``em_update(x)`` (one EM
step, in place) and ``log_prob(x)`` (exact ``log p(x)`` per datapoint) can be fitted.
EM never decreases the log-likelihood (Dempster, Laird & Rubin, 1977), so the recorded
history is a check on the model's update as much as a record of progress.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.base import DGMError, GenerativeModel

__all__ = ["run_em"]


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
