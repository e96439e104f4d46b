"""Learning-rate schedules of the training loop.

The learning rate of optimizer step ``t`` (counted from 0 over the whole run) is a pure
function of ``t``, the steps per epoch and the :class:`~inference.config.TrainConfig`, so a
schedule has no state of its own: the step count in the checkpoint is its state, and a
resumed run takes bit-for-bit the learning rates of an uninterrupted one. The runner sets
every parameter group's rate to :func:`learning_rate` before each step (times
``ROLLBACK_LR_FACTOR`` per divergence rollback).

With ``e = t // steps_per_epoch`` the epoch of step ``t`` and ``lr`` the ``--lr``:

* ``constant``: ``lr``.
* ``burda``: Burda, Grosse and Salakhutdinov (2016), section 5: stage ``i = 0 .. S-1`` runs
  ``3^i`` epochs at ``lr * 10^(-i / 7)``; ``S = --lr-burda-stages`` (8 in the paper: 3,280
  epochs, lr 1e-3 down to 1e-4). The schedule fixes the run's length: ``--epochs`` must be
  ``(3^S - 1) / 2`` (refused otherwise, see :func:`fixed_epochs`).
* ``cosine``: ``lr_min + (lr - lr_min) (1 + cos(pi t / T)) / 2`` per step, ``T = epochs x
  steps_per_epoch`` (Loshchilov and Hutter 2017, without restarts); it ends at ``--lr-min``.
* ``step``: ``lr * factor^floor(e / every)`` (``--lr-step-factor`` every ``--lr-step-every``
  epochs).

``burda`` and ``cosine`` depend on the run's total length, so a finished run with either
cannot be given more epochs without changing the rates it already used
(:func:`extendable`).
"""

from __future__ import annotations

import math
from typing import Optional

SCHEDULES = ("constant", "burda", "cosine", "step")
SPAN_THE_RUN = ("burda", "cosine")
"""Schedules whose rates depend on the run's total number of epochs."""


def burda_epochs(stages: int) -> int:
    """``sum_{i < stages} 3^i``: the epochs of Burda et al.'s schedule with ``stages`` stages."""
    return (3**stages - 1) // 2


def fixed_epochs(config) -> Optional[int]:
    """The number of epochs the schedule of ``config`` fixes (``burda``), else ``None``."""
    return burda_epochs(config.lr_burda_stages) if config.lr_schedule == "burda" else None


def extendable(config) -> bool:
    """Whether a finished run with ``config`` can train more epochs with the rates it used."""
    return config.lr_schedule not in SPAN_THE_RUN


def burda_stage(epoch: int) -> int:
    """The stage ``i`` of Burda et al.'s schedule that epoch ``epoch`` (from 0) belongs to."""
    i = 0
    while epoch >= burda_epochs(i + 1):
        i += 1
    return i


def learning_rate(config, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) under ``config``'s schedule."""
    name, lr = config.lr_schedule, config.lr
    if name == "constant":
        return lr
    epoch = step // steps_per_epoch
    if name == "burda":
        return lr * 10.0 ** (-min(burda_stage(epoch), config.lr_burda_stages - 1) / 7.0)
    if name == "step":
        return lr * config.lr_step_factor ** (epoch // config.lr_step_every)
    if name == "cosine":
        total = max(config.epochs * steps_per_epoch, 1)
        progress = min(step, total) / total
        return config.lr_min + (lr - config.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def describe(config) -> str:
    """The schedule in words, e.g. ``cosine 0.001 -> 0``."""
    name = config.lr_schedule
    if name == "constant":
        return f"constant {config.lr:g}"
    if name == "burda":
        return f"burda {config.lr_burda_stages} stages (3^i epochs at {config.lr:g} x 10^(-i/7))"
    if name == "cosine":
        return f"cosine {config.lr:g} -> {config.lr_min:g}"
    return f"step {config.lr:g} x {config.lr_step_factor:g} every {config.lr_step_every} epochs"
