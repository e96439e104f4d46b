"""Typed configuration of the inference parts: one dataclass per component.

* :class:`ObjectiveConfig`: which objective (``OBJECTIVES``) and its settings, KL schedules
  included.
* :class:`GuideConfig`: which guide (``GUIDES``) and its settings.
* :class:`TrainConfig`: the training loop (optimizer, batches, epochs, checkpoints).
* :class:`EvalConfig`: the held-out evaluation (estimator from ``ESTIMATORS`` and its
  settings).

Every field carries its command-line help in ``metadata["help"]`` (and, where the values are
a fixed set, ``metadata["choices"]``); ``experiments.config`` turns these dataclasses into
the ``dgm`` flags in one place, so a new setting is one field here. Fields marked
``metadata["display"] = True`` change what is shown or where it runs, not what is
computed: a run may resume with other values of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from inference.lr_schedules import SCHEDULES, fixed_epochs
from models.base import DGMError


def setting(default: Any, help: str, **meta) -> Any:
    """A config field with its command-line help (and optional ``choices``, ``display``)."""
    return field(default=default, metadata={"help": help, **meta})


class ConfigError(DGMError, ValueError):
    """A configuration value out of range; the message names the setting and the fix."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class ObjectiveConfig:
    name: str = setting("elbo", "training objective (see `dgm list`)", flag="objective")
    k: int = setting(1, "samples per datapoint in the objective")
    analytic_kl: bool = setting(False, "closed-form KL in the ELBO where available")
    baseline: str = setting("average", "baseline of the score-function ELBO", choices=("none", "average", "neural"))
    alpha: float = setting(0.5, "renyi: the bound's alpha >= 0 (0: IWAE, 1: the ELBO)")
    kl_warmup: int = setting(0, "KL annealing: steps to warm beta up to 1 (0: off)")
    kl_beta0: float = setting(0.0, "KL annealing: beta at step 0")
    free_bits: float = setting(0.0, "free bits: nats floor per latent group (0: off)")
    free_bits_per: str = setting("site", "free bits groups", choices=("site", "dimension"))

    def check(self) -> None:
        require(self.k >= 1, f"--k must be >= 1, got {self.k}")
        require(self.kl_warmup >= 0, f"--kl-warmup must be >= 0 steps, got {self.kl_warmup}")
        require(finite(self.kl_beta0) and 0 <= self.kl_beta0 <= 1, f"--kl-beta0 must be in [0, 1], got {self.kl_beta0}")
        require(finite(self.free_bits) and self.free_bits >= 0, f"--free-bits must be >= 0, got {self.free_bits}")
        require(finite(self.alpha) and self.alpha >= 0, f"--alpha must be a finite number >= 0, got {self.alpha}")

    def describe(self) -> str:
        """The objective and the settings that change it, e.g. ``iwae K=5``."""
        text = self.name + (f" K={self.k}" if self.k > 1 else "")
        return text + (f" alpha={self.alpha:g}" if self.name == "renyi" else "")


LOCAL_LR = 0.1
"""The local guide's learning rate: each per-datapoint parameter is updated once an epoch,
so it needs far larger steps than the shared networks' (see GuideConfig.local_lr)."""


@dataclass
class GuideConfig:
    name: str = setting(
        "amortized", "guide (see `dgm list`): the model's encoder, local parameters, a flow", flag="guide"
    )
    flow_depth: int = setting(2, "flow guides: number of flow steps")
    flow_hidden: Optional[int] = setting(None, "flow guides: hidden width (default max(16, 4 * latent size))")
    refit_epochs: int = setting(100, "local guides: epochs to fit held-out data with the model frozen")
    local_lr: Optional[float] = setting(LOCAL_LR, "local guides: Adam learning rate of the per-datapoint parameters")
    local_init_scale: float = setting(1.0, "local guides: initial standard deviation of q (1: the prior's)")
    local_steps: int = setting(5, "local guides: natural-gradient steps on each minibatch's rows before each step")
    refine_steps: int = setting(5, "semi-amortized guide: gradient steps refining the encoder's q(z | x) per datapoint")
    refine_lr: float = setting(0.1, "semi-amortized guide: step size of the refinement (natural-gradient ascent)")

    def check(self) -> None:
        require(self.flow_depth >= 1, f"--flow-depth must be >= 1, got {self.flow_depth}")
        require(self.refit_epochs >= 1, f"--refit-epochs must be >= 1, got {self.refit_epochs}")
        require(
            self.local_lr is None or (finite(self.local_lr) and self.local_lr > 0),
            f"--local-lr must be > 0, got {self.local_lr}",
        )
        require(
            finite(self.local_init_scale) and self.local_init_scale > 0,
            f"--local-init-scale must be > 0, got {self.local_init_scale}",
        )
        require(self.local_steps >= 0, f"--local-steps must be >= 0, got {self.local_steps}")
        require(self.refine_steps >= 0, f"--refine-steps must be >= 0, got {self.refine_steps}")
        require(finite(self.refine_lr) and self.refine_lr > 0, f"--refine-lr must be > 0, got {self.refine_lr}")
        require(
            self.flow_hidden is None or self.flow_hidden >= 1, f"--flow-hidden must be >= 1, got {self.flow_hidden}"
        )


@dataclass
class TrainConfig:
    epochs: int = setting(10, "passes over the training set")
    batch_size: int = setting(100, "datapoints per optimizer step")
    lr: float = setting(1e-3, "Adam learning rate")
    adam_eps: float = setting(1e-4, "Adam epsilon")
    lr_schedule: str = setting(
        "constant",
        "learning-rate schedule: constant; burda (3^i epochs at lr x 10^(-i/7), Burda et al. 2016); "
        "cosine (to --lr-min over the run); step (x --lr-step-factor every --lr-step-every epochs)",
        choices=SCHEDULES,
    )
    lr_min: float = setting(0.0, "cosine schedule: the learning rate it ends at")
    lr_step_every: int = setting(10, "step schedule: epochs between learning-rate drops")
    lr_step_factor: float = setting(0.5, "step schedule: factor of each drop")
    lr_burda_stages: int = setting(8, "burda schedule: stages i = 0..S-1; the run is (3^S - 1) / 2 epochs (8: 3280)")
    grad_clip: Optional[float] = setting(None, "clip the gradients' global L2 norm to this (0 or unset: off)")
    seed: int = setting(0, "seeds the model's initialization, the data order and every sample")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", display=True)
    log_every: int = setting(50, "steps between metrics lines (host syncs)", display=True)
    validate: bool = setting(True, "compute the validation bound after each epoch", cli=False)
    patience: Optional[int] = setting(None, "early stopping after this many epochs without improvement")
    checkpoint_seconds: float = setting(60.0, "checkpoint at least this often (and at every epoch end)", display=True)
    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps")
    progress: bool = setting(True, "progress bars", display=True, cli=False)

    def check(self) -> None:
        require(self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(finite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0, got {self.lr}")
        require(finite(self.adam_eps) and self.adam_eps > 0, f"--adam-eps must be > 0, got {self.adam_eps}")
        require(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        require(self.patience is None or self.patience >= 1, f"--patience must be >= 1, got {self.patience}")
        require(
            finite(self.checkpoint_seconds) and self.checkpoint_seconds >= 0,
            f"--checkpoint-seconds must be a finite number >= 0, got {self.checkpoint_seconds}",
        )
        require(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        require(self.lr_schedule in SCHEDULES, f"--lr-schedule must be one of {', '.join(SCHEDULES)}")
        require(
            finite(self.lr_min) and 0 <= self.lr_min <= self.lr,
            f"--lr-min must be in [0, --lr = {self.lr:g}], got {self.lr_min}",
        )
        require(self.lr_step_every >= 1, f"--lr-step-every must be >= 1 epoch, got {self.lr_step_every}")
        require(
            finite(self.lr_step_factor) and 0 < self.lr_step_factor <= 1,
            f"--lr-step-factor must be in (0, 1], got {self.lr_step_factor}",
        )
        require(1 <= self.lr_burda_stages <= 12, f"--lr-burda-stages must be in 1..12, got {self.lr_burda_stages}")
        require(
            self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip >= 0),
            f"--grad-clip must be a finite number >= 0 (0: off), got {self.grad_clip}",
        )
        fixed = fixed_epochs(self)
        require(
            fixed is None or self.epochs == fixed,
            f"--lr-schedule burda with --lr-burda-stages {self.lr_burda_stages} runs exactly {fixed} epochs "
            f"(3^i epochs at stage i); pass --epochs {fixed}, or change --lr-burda-stages (got --epochs {self.epochs})",
        )


@dataclass
class EvalConfig:
    estimator: str = setting(
        "auto", "log p(x) estimator (see `dgm list`); auto: exact where it exists, else nested (global latents) or is"
    )
    k: int = setting(1000, "samples per datapoint of the sampling estimators")
    global_samples: int = setting(100, "nested: draws S of the global latents from their guide, K local samples each")
    limit: Optional[int] = setting(None, "evaluate the first N datapoints only")
    batch_size: int = setting(100, "datapoints per evaluation batch", display=True)
    steps: int = setting(1000, "AIS: intermediate distributions T")
    chains: int = setting(16, "AIS: chains per datapoint C")
    leapfrog: int = setting(10, "AIS: leapfrog steps L per HMC transition")
    ais_start: str = setting("prior", "AIS: initial distribution", choices=("prior", "guide"))
    ais_schedule: str = setting("sigmoid", "AIS: schedule of the inverse temperatures", choices=("sigmoid", "linear"))

    def check(self) -> None:
        require(self.k >= 1, f"the number of samples K must be >= 1, got {self.k}")
        require(self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}")
        require(self.batch_size >= 1, f"the evaluation batch size must be >= 1, got {self.batch_size}")
        for name in ("steps", "chains", "leapfrog"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"--{name} (AIS) must be an integer >= 1, got {value!r}",
            )
        require(self.global_samples >= 1, f"--global-samples must be >= 1, got {self.global_samples}")
        for name in ("ais_start", "ais_schedule"):
            allowed = next(f for f in fields(self) if f.name == name).metadata["choices"]
            value = getattr(self, name)
            require(value in allowed, f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")


def from_dict(cls, values: Optional[Dict[str, Any]], what: str):
    """``cls(**values)``, refusing unknown keys with the list of known ones."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)
