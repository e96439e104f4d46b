"""The one training and evaluation loop.

The runner owns everything around the objective: device placement, seeding, the torch
optimizer, minibatching (with per-epoch dynamic binarization), per-term logging,
validation and early stopping, progress bars, atomic checkpoints and resume, and the final
evaluation. Models and objectives contain no loops; amortized and per-datapoint guides
differ only in how they are built (``inference.guides.build_guide``).

Reproducibility: one CPU ``torch.Generator`` draws each epoch's permutation and
binarization, the global torch RNG (seeded once) draws the model's samples. A checkpoint
stores the data generator's state at the start of the epoch, the position in the epoch and
the global RNG state, so a run killed at any point resumes bit-for-bit on the same machine.

No host sync per step: losses are summed on the device and read every ``log_every`` steps.

Labels: for a model with ``uses_labels`` the runner passes ``y`` = the labels of the same
rows (``data.train_labels[idx]`` for a minibatch, ``val_labels`` / ``test_labels`` slices
when validating and evaluating) to every call of model and guide, and refuses data
without labels before training. Other models are called exactly as before.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from inference.diagnostics import active_units
from inference.estimators import estimate_dataset
from inference.guides import build_guide
from inference.objectives import ELBO, LogWeightObjective
from models.base import DGMError, GenerativeModel


class DataSource(Protocol):
    """What the runner needs of a dataset (``experiments.data.Dataset`` is one); a model
    with ``uses_labels`` also needs ``train_labels``, ``val_labels`` and ``test_labels``."""

    train: Tensor
    val: Tensor
    test: Tensor

    def train_epoch(self, generator: torch.Generator) -> Tensor: ...


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    adam_eps: float = 1e-4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 50  # steps between host syncs (metrics lines)
    validate: bool = True
    patience: Optional[int] = None  # epochs without validation improvement before stopping
    checkpoint_seconds: float = 60.0  # also checkpoint mid-epoch this often
    max_steps: Optional[int] = None  # stop early (tests, smoke runs)
    eval_estimator: str = "auto"  # auto: exact if the model has it, else is
    eval_k: int = 1000
    eval_limit: Optional[int] = None  # evaluate on the first n test points only
    eval_batch_size: int = 100
    local_eval_epochs: int = 20  # fitting a local guide on held-out data (decoder frozen)
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DGMError(
            "--device cuda, but torch sees no CUDA device; install a CUDA build of torch or use --device cpu"
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DGMError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


@contextmanager
def eval_mode(*modules: Optional[nn.Module]):
    """Evaluate in eval mode (mask ensembles, dropout, batch norm), then restore each
    module's mode."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Runner:
    """Fits ``model`` (with the chosen guide) to ``data`` by minimising ``objective``."""

    def __init__(
        self,
        model: GenerativeModel,
        data: DataSource,
        objective: LogWeightObjective,
        guide: str = "amortized",
        config: Optional[TrainConfig] = None,
        run_dir: Optional[Path] = None,
        guide_options: Optional[Dict] = None,
    ):
        self.config = config or TrainConfig()
        self.device = resolve_device(self.config.device)
        torch.manual_seed(self.config.seed)
        self.model = model.to(self.device)
        self.data = data
        for split in ("train", "val", "test"):
            x = getattr(data, split)
            if x is not None and x.shape[0]:
                model.check_data(
                    x
                    if split != "train" or not getattr(data, "dynamic", False)
                    else data.train_epoch(torch.Generator().manual_seed(0)),
                    f"{split} data",
                )
        self.labels = self._labels(model, data) if model.uses_labels else None
        if model.uses_labels and guide != "amortized":
            raise DGMError(
                f"{type(model).__name__} takes class labels and only its own (amortized) guide receives them; "
                f"use --guide amortized instead of {guide}"
            )
        self.objective = objective
        self.closed_form = getattr(objective, "closed_form", False)  # EM: closed-form steps, no gradients
        if self.closed_form:
            objective.check(model)
            if guide != "amortized":
                raise DGMError("closed-form EM steps use no guide; drop --guide")
        self.guide_kind = guide
        self.guide, self.guide_module = build_guide(guide, model, data.train.to(self.device), **(guide_options or {}))
        if self.guide_module is not None:
            self.guide_module.to(self.device)
        for m in objective.modules():
            m.to(self.device)
        self.params = self._collect_params()
        self.optimizer = torch.optim.Adam(self.params, lr=self.config.lr, eps=self.config.adam_eps)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir else None)
        self._best_model: Optional[dict] = None

    def _labels(self, model: GenerativeModel, data: DataSource) -> Dict[str, Tensor]:
        """The labels of every non-empty split, checked and on the device."""
        labels = {}
        for split in ("train", "val", "test"):
            x = getattr(data, split)
            if x is None or not x.shape[0]:
                continue
            y = getattr(data, f"{split}_labels", None)
            if y is None:
                raise DGMError(
                    f"{type(model).__name__} needs class labels, but the {split} data of "
                    f"{getattr(data, 'name', 'this dataset')} has none; use a labelled dataset "
                    "(mnist, mnist-logit, mnist-embedded or digits)"
                )
            model.check_labels(y, x.shape[0], f"{split} labels")
            labels[split] = y.to(self.device)
        return labels

    def _conditions(self, split: str, rows=None) -> Dict[str, Tensor]:
        """Keyword arguments of model and guide for ``rows`` of ``split``: ``{"y": labels}``
        for a model with labels, nothing otherwise."""
        if self.labels is None:
            return {}
        y = self.labels[split]
        return {"y": y if rows is None else y[rows]}

    def _collect_params(self) -> List[nn.Parameter]:
        modules = [self.model] + ([self.guide_module] if self.guide_module is not None else [])
        modules += self.objective.modules()
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not params:
            raise DGMError("nothing to train: the model, guide and objective have no parameters")
        return params

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.run_dir / "checkpoint.pt" if self.run_dir else None

    def _state(self, progress: dict) -> dict:
        return {
            "model": self.model.state_dict(),
            "guide": self._guide_state(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **progress,
        }

    def _guide_state(self) -> Optional[dict]:
        """Parameters of a guide the model does not hold (local and flow guides)."""
        return self.guide_module.state_dict() if self.guide_module is not None else None

    def save_checkpoint(self, progress: dict) -> None:
        if self.checkpoint_path is not None:
            _atomic_save(self._state(progress), self.checkpoint_path)

    def _restore(self) -> Optional[dict]:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # a torn file cannot happen (atomic writes), a foreign one can
            raise DGMError(f"cannot read checkpoint {path}: {e}; delete it to start over") from e
        self.model.load_state_dict(state["model"])
        if self.guide_module is not None and state["guide"] is not None:
            self.guide_module.load_state_dict(state["guide"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.metrics.truncate_after(state["step"])
        return state

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> Dict:
        """Train until ``epochs`` (or early stopping / ``max_steps``), resuming from a
        checkpoint in ``run_dir`` if there is one. Returns the training summary."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        progress = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "data_rng": gen.get_state(),
            "best_val": -math.inf,
            "bad_epochs": 0,
            "train_seconds": 0.0,
            "done": False,
        }
        resumed = self._restore()
        if resumed is not None:
            progress = {k: resumed[k] for k in progress}
        n = self.data.train.shape[0]
        start = time.time() - progress["train_seconds"]
        last_ckpt = time.time()
        for epoch in range(progress["epoch"], cfg.epochs if not progress["done"] else 0):
            gen.set_state(progress["data_rng"])  # the epoch's data, reproducibly
            x_epoch = self.data.train_epoch(gen).to(self.device)
            perm = torch.randperm(n, generator=gen).to(self.device)
            batch_size = n if self.closed_form else cfg.batch_size  # an EM step sees every datapoint
            num_batches = math.ceil(n / batch_size)
            sums, count = None, 0
            bar = tqdm(
                range(progress["batch"], num_batches),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress,
                leave=False,
                mininterval=2.0,
            )
            for b in bar:
                idx = perm[b * batch_size : (b + 1) * batch_size]
                terms = self._step(x_epoch[idx], idx, n, progress["step"])
                progress["step"] += 1
                progress["batch"] = b + 1
                sums = {k: v for k, v in terms.items()} if sums is None else {k: sums[k] + v for k, v in terms.items()}
                count += 1
                last = b == num_batches - 1 or (cfg.max_steps is not None and progress["step"] >= cfg.max_steps)
                if progress["step"] % cfg.log_every == 0 or last:
                    record = self._log_train(progress["step"], epoch + (b + 1) / num_batches, sums, count)
                    bar.set_postfix(bound=f"{record['bound']:.2f}")
                    sums, count = None, 0
                progress["train_seconds"] = time.time() - start
                if cfg.max_steps is not None and progress["step"] >= cfg.max_steps:
                    break
                if time.time() - last_ckpt > cfg.checkpoint_seconds:
                    self.save_checkpoint(progress)
                    last_ckpt = time.time()
            bar.close()
            stop = cfg.max_steps is not None and progress["step"] >= cfg.max_steps
            if progress["batch"] >= num_batches:  # a whole epoch done
                progress["epoch"], progress["batch"] = epoch + 1, 0
                progress["data_rng"] = gen.get_state()
                stop = self._validate(progress) or stop
            elif stop:  # the step budget ends mid-epoch: validate what it trained
                self._validate(progress)
            progress["train_seconds"] = time.time() - start
            self.save_checkpoint(progress)
            last_ckpt = time.time()
            if stop:
                break
        progress["done"] = True
        self.save_checkpoint(progress)
        best = self._best_model
        if self.run_dir is not None and (self.run_dir / "best.pt").exists():
            best = torch.load(self.run_dir / "best.pt", map_location=self.device)
        if best is not None:
            self.model.load_state_dict(best["model"])
            if self.guide_module is not None and best.get("guide") is not None:
                self.guide_module.load_state_dict(best["guide"])
        self.model.after_fit(self.data.train)
        return progress

    def _step(self, x: Tensor, idx: Tensor, n: int, step: int) -> Dict[str, Tensor]:
        """One optimizer step on the minibatch ``x`` (rows ``idx`` of ``n``), or one
        closed-form step of a closed-form objective; returns the detached terms."""
        if self.closed_form:
            return self.objective.step(self.model, x)
        if hasattr(self.objective, "set_step"):  # KL schedules (EnumELBO has none)
            self.objective.set_step(step)
        loss, terms = self.objective.loss_terms(
            self.model.model, self.guide, x, idx, n, **self._conditions("train", idx)
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        terms["loss"] = loss.detach() / n
        return terms

    def _log_train(self, step: int, epoch: float, sums: Dict[str, Tensor], count: int) -> Dict[str, float]:
        """Write the mean of the training terms since the last record; refuse a non-finite loss."""
        record = {k: float(v) / count for k, v in sums.items()}
        if not math.isfinite(record["loss"]):
            raise DGMError(
                f"the loss became {record['loss']} at step {step}; lower --lr "
                "or check the data (the last good checkpoint is kept)"
            )
        self.metrics.write({"step": step, "epoch": epoch, "split": "train", **record})
        return record

    def _validate(self, progress: dict) -> bool:
        """Record the validation bound; return True when early stopping says stop."""
        cfg = self.config
        if not cfg.validate or self.guide_kind == "local" or self.data.val is None:
            return False
        val = self.data.val.to(self.device)
        with eval_mode(self.model, self.guide_module):
            bounds = [
                self.objective.bound(
                    self.model.model,
                    self.guide,
                    val[i : i + cfg.eval_batch_size],
                    **self._conditions("val", slice(i, i + cfg.eval_batch_size)),
                )
                for i in range(0, val.shape[0], cfg.eval_batch_size)
            ]
        value = float(torch.cat(bounds).mean())
        self.metrics.write({"step": progress["step"], "epoch": progress["epoch"], "split": "val", "bound": value})
        if value > progress["best_val"]:
            progress["best_val"], progress["bad_epochs"] = value, 0
            best = {"model": self.model.state_dict(), "guide": self._guide_state(), "epoch": progress["epoch"]}
            if self.run_dir is not None:
                _atomic_save(best, self.run_dir / "best.pt")
            else:  # no run directory: keep the best weights in memory
                self._best_model = _detached(best)
            return False
        progress["bad_epochs"] += 1
        return cfg.patience is not None and progress["bad_epochs"] >= cfg.patience

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(
        self,
        data: Optional[Tensor] = None,
        estimator: Optional[str] = None,
        k: Optional[int] = None,
        labels: Optional[Tensor] = None,
    ) -> Dict:
        """log p(x) on held-out data (test set by default) with the configured estimator,
        plus the ELBO and active units. A local guide is first fitted on the held-out data
        with the model frozen. A model with labels needs ``labels`` of given ``data`` (for
        the test set they are the dataset's); it then reports log p(x | y) or log p(x, y)."""
        cfg = self.config
        x = self.data.test if data is None else data
        conditions = self._conditions("test") if data is None else {}
        if self.model.uses_labels and data is not None:
            if labels is None:
                raise DGMError(f"{type(self.model).__name__} is evaluated with class labels: pass labels= for the data")
            self.model.check_labels(labels, x.shape[0], "evaluation labels")
            conditions = {"y": labels}
        if cfg.eval_limit is not None:
            x = x[: cfg.eval_limit]
            conditions = {key: value[: cfg.eval_limit] for key, value in conditions.items()}
        x = x.to(self.device)
        conditions = {key: value.to(self.device) for key, value in conditions.items()}
        method = estimator or cfg.eval_estimator
        if method == "auto":
            method = "exact" if self.model.has_exact_log_prob else "is"
        with eval_mode(self.model, self.guide_module):
            return self._evaluate(x, method, k or cfg.eval_k, conditions)

    def _evaluate(self, x: Tensor, method: str, k: int, conditions: Dict[str, Tensor]) -> Dict:
        cfg = self.config
        guide = self.guide if self.guide_kind != "local" else None
        if method != "exact" and self.guide_kind == "local":
            guide = fit_local_guide(self.model, x, self.objective, cfg)
        t0 = time.time()
        est = estimate_dataset(
            self.model,
            x,
            method=method,
            num_samples=k,
            guide=guide,
            batch_size=cfg.eval_batch_size,
            progress=cfg.progress,
            conditions=conditions or None,
        )
        out = {**est.summary(), "eval_seconds": time.time() - t0}
        if method != "exact" and guide is not None:
            out["active_units"] = active_units(self.model, guide, x, conditions=conditions or None)
        return out


def fit_local_guide(
    model: GenerativeModel,
    x: Tensor,
    objective: LogWeightObjective,
    config: TrainConfig,
    init_from: Optional[Callable] = None,
) -> Callable:
    """Fit per-datapoint variational parameters on ``x`` with the model frozen (the
    held-out evaluation of a local guide, and the best-q half of the amortization gap)."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        data = _Fixed(x)
        cfg = TrainConfig(
            **{
                **asdict(config),
                "epochs": config.local_eval_epochs,
                "validate": False,
                "max_steps": None,
                "device": str(x.device),
            }
        )
        runner = Runner(
            model,
            data,
            ELBO(objective.num_particles) if not isinstance(objective, ELBO) else objective,
            guide="local",
            config=cfg,
        )
        if init_from is not None:
            runner.guide_module.init_from(init_from, x)
        runner.fit()
        return runner.guide
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _Fixed:
    """A held-out tensor presented as a training set."""

    dynamic = False

    def __init__(self, x: Tensor):
        self.train, self.val, self.test = x, None, None

    def train_epoch(self, generator: torch.Generator) -> Tensor:
        return self.train


def _detached(state):
    """A copy of a (nested) state dict that later optimizer steps do not change."""
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    return state.detach().clone() if isinstance(state, Tensor) else state
