"""Held-out evaluation of a trained model and guide, with no runner, optimizer or data set:

    evaluate(model, guide, x, EvalConfig(estimator="is", k=5000))

returns the estimator's summary (log p(x) per datapoint reduced to the mean NLL, its
standard error and the estimator's diagnostics), plus active units where the estimator
proposes from a guide. A guide that declares ``refit_on_new_data`` (the local guide) is
first fitted on ``x`` with the model frozen.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

from torch import Tensor

from inference.config import EvalConfig, TrainConfig
from inference.device import eval_mode
from inference.diagnostics import active_units
from inference.estimators import estimate_dataset, make_estimator
from inference.guides import AmortizedGuide, Guide
from models.base import GenerativeModel

UNRELIABLE_SHARE = 0.5
"""IS estimates are flagged when PSIS k-hat > 0.7 (Vehtari et al.'s threshold) on more than
this share of the datapoints."""


def trust_warning(summary: Dict) -> Optional[str]:
    """A plain sentence when the summary's own diagnostics say its number is unreliable:
    k-hat > 0.7 on most datapoints, where the estimator declares k-hat its trust figure."""
    share = summary.get("khat_frac_above_0.7")
    if "khat_frac_above_0.7" in summary.get("trust", ()) and share is not None and share > UNRELIABLE_SHARE:
        return (
            f"PSIS k-hat > 0.7 on {share:.0%} of the datapoints: this importance-sampling estimate of log p(x) "
            "is unreliable there (likely too high an NLL); check it with --estimator ais"
        )
    return None


def evaluate(
    model: GenerativeModel,
    guide: Optional[Guide],
    x: Tensor,
    config: Optional[EvalConfig] = None,
    *,
    conditions: Optional[Dict[str, Tensor]] = None,
    num_particles: int = 1,
    train: Optional[TrainConfig] = None,
    keep_values: bool = False,
) -> Dict:
    """Estimate log p(x) on ``x`` (``config.limit`` first rows) with ``config.estimator``.

    ``guide`` defaults to the model's own; ``conditions`` are keyword tensors of model and
    guide with one row per datapoint (``{"y": labels}``); ``num_particles`` and ``train``
    (its optimizer settings) set the refit of a guide that needs one; ``keep_values`` adds
    the per-datapoint estimates (``"log_px"``, a list) for paired comparisons."""
    config = config or EvalConfig()
    estimator = make_estimator(config, model)
    guide = guide if guide is not None else AmortizedGuide(model=model)
    conditions = dict(conditions or {})
    if config.limit is not None:
        x = x[: config.limit]
        conditions = {key: value[: config.limit] for key, value in conditions.items()}
    model.check_data(x, "evaluation data")
    progress = True if train is None else train.progress
    with eval_mode(model, guide):
        if estimator.uses_guide:
            guide = guide.for_data(model, x, num_particles=num_particles, train=train)
        t0 = time.time()
        est = estimate_dataset(
            model,
            x,
            guide=guide,
            batch_size=config.batch_size,
            progress=progress,
            conditions=conditions or None,
            estimator=estimator,
        )
        out = {**est.summary(estimator.reports), "trust": list(estimator.trust), "eval_seconds": time.time() - t0}
        if keep_values:
            out["log_px"] = est.log_px.double().tolist()
        warning = trust_warning(out)
        if warning is not None:
            out["warning"] = warning
        if estimator.uses_guide:
            out["active_units"] = active_units(model, guide, x, conditions=conditions or None)
    return out
