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
The learning rate of each step comes from ``inference.lr_schedules``, a function of the
checkpointed step count (and rollbacks), so schedules resume exactly too; ``grad_clip``
clips the gradients' global norm in a hook that runs before every ``optimizer.step()``.

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
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from inference.config import EvalConfig, GuideConfig, ObjectiveConfig, TrainConfig
from inference.device import eval_mode, resolve_device
from inference.evaluation import evaluate
from inference.guides import Guide, build_guide
from inference.lr_schedules import learning_rate
from inference.objective import Objective, make_objective
from inference.rundir import CONFIG, SUMMARY, run_record, summary, write_json, write_run_record, written_by_runner
from models.base import DGMError, DGMWarning, GenerativeModel

__all__ = ["Runner", "TrainConfig", "EvalConfig", "fit_local_guide", "load_state", "CHECKPOINT", "BEST", "FINAL"]

CHECKPOINT, BEST, FINAL = "checkpoint.pt", "best.pt", "final.pt"
"""A run directory's weights: the resumable state, the best validation weights, and the
weights training ended on (best validation weights after ``after_fit``), which
``experiments.runs.load_run`` restores without any training or data pass."""


class DataSource(Protocol):
    """What the runner needs of a dataset (``experiments.data.Dataset`` is one); a model
    with ``uses_labels`` also needs ``train_labels``, ``val_labels`` and ``test_labels``
    (``None`` where a split has none). ``dynamic``: ``train`` holds probabilities that
    ``train_epoch`` binarizes afresh each epoch."""

    name: str
    train: Tensor
    val: Optional[Tensor]
    test: Optional[Tensor]
    dynamic: bool
    source: Optional[dict]  # how to load it again (``experiments.data.load`` sets it); None: it cannot be

    def train_epoch(self, generator: torch.Generator) -> Tensor: ...


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path, device: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint written by the runner without executing any code: only tensors,
    numbers, strings and containers of them are accepted (``weights_only=True``). A file
    that is damaged, or needs more than that, is refused in one line naming the file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DGMError(f"{path} does not exist; train the run first (`dgm train`)") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DGMError(
            f"cannot read {path}: it is damaged or is not a pyro-dgm checkpoint ({first[:200]}); "
            "delete it (and retrain or resume from another copy)"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise DGMError(f"{path} is not a pyro-dgm checkpoint (no model weights); delete it")
    return state


def reopen_checkpoint(path: Path) -> None:
    """Mark the finished run's checkpoint ``path`` as not done, so that a runner with more
    ``epochs`` goes on from its last step (weights, optimizer, data generator and RNG states
    as training left them) exactly as an uninterrupted longer run would."""
    state = load_state(path)
    state["done"] = False
    _atomic_save(state, Path(path))


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step``; a torn line (a kill while appending) is dropped."""
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill mid-write: nothing after it was written either
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


MAX_ROLLBACKS = 3
ROLLBACK_LR_FACTOR = 0.1
DIVERGENCE_FACTOR = 100.0
"""Divergence: a non-finite loss, validation bound or parameter, or a training loss per
datapoint above ``DIVERGENCE_FACTOR`` times a reference: the code length of the uniform
distribution, ``D log K`` nats, for discrete data (no trained model should be 100 times
worse than chance; a VAE starts near 1x), else the first logged loss's magnitude (at least
1 nat). The runner then rolls back to the last good checkpoint, multiplies the learning
rate by ``ROLLBACK_LR_FACTOR`` and goes on, at most ``MAX_ROLLBACKS`` times per run."""


STEP_VALUES_PER_DATUM = 16


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on ``device`` (``None`` where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class _Diverged(Exception):
    def __init__(self, what: str, step: int):
        super().__init__(what)
        self.what, self.step = what, step


_HELD_LOCKS: set = set()


@contextmanager
def run_lock(run_dir: Optional[Path]):
    """Hold an exclusive lock on ``run_dir`` (a second process training there is refused
    in one line); re-entrant within one process; no-op without a directory."""
    if run_dir is None:
        yield
        return
    path = (Path(run_dir) / ".lock").resolve()
    if path in _HELD_LOCKS:
        yield
        return
    import fcntl

    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DGMError(
                f"another process is training in {run_dir}; wait for it to finish or use another --run-dir"
            ) from None
        _HELD_LOCKS.add(path)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(path)
            fcntl.flock(f, fcntl.LOCK_UN)


class Runner:
    """Fits ``model`` (with the chosen guide) to ``data`` by minimising ``objective``.

    ``objective`` is an :class:`~inference.objective.Objective` or the
    :class:`~inference.config.ObjectiveConfig` to build one from. ``guide`` is a
    :class:`~inference.guides.Guide`, or the name of a registered one (built with
    ``guide_options``, the fields of ``GuideConfig``). ``evaluation`` sets the held-out
    evaluation of :meth:`evaluate` (and the validation batch size).

    ``run_dir``: checkpoints, metrics and weights go there, and :meth:`fit` writes the same
    ``config.json`` and ``data.json`` as ``dgm train`` where they are missing
    (``inference.rundir``), so ``dgm eval`` / ``sample`` / ``score`` and
    ``experiments.runs.load_run`` accept the directory. That asks the model class to be
    importable again (a registered model, or a class at the top level of a ``.py`` file) and
    the data to come from ``experiments.data.load`` with ``seed=config.seed``.

    Reproducibility: ``config.seed`` seeds training; seed the model's construction too, with
    ``inference.set_seed(seed)`` before building it.
    """

    def __init__(
        self,
        model: GenerativeModel,
        data: DataSource,
        objective: Union[Objective, ObjectiveConfig],
        guide: Union[str, Guide] = "amortized",
        config: Optional[TrainConfig] = None,
        run_dir: Optional[Path] = None,
        guide_options: Optional[Dict] = None,
        evaluation: Optional[EvalConfig] = None,
    ):
        self.config = config or TrainConfig()
        self.config.check()
        self.evaluation = evaluation or EvalConfig()
        self.evaluation.check()
        self.device = resolve_device(self.config.device)
        torch.manual_seed(self.config.seed)
        self.model = model.to(self.device)
        self.data = data
        for split in ("train", "val", "test"):
            x = getattr(data, split)
            if x is not None and x.shape[0]:
                model.check_data(
                    data.train_epoch(torch.Generator().manual_seed(0)) if split == "train" and data.dynamic else x,
                    f"{split} data",
                )
        self.labels = self._labels(model, data) if model.uses_labels else None
        if isinstance(objective, ObjectiveConfig):
            objective = make_objective(objective, model.data_spec)
        objective.check(model)
        self.objective = objective
        if isinstance(guide, str):
            guide = build_guide(GuideConfig(name=guide, **(guide_options or {})), model, data.train.to(self.device))
        if model.uses_labels and not guide.is_model_guide:
            raise DGMError(
                f"{type(model).__name__} takes class labels and only its own (amortized) guide receives them; "
                f"use --guide amortized instead of {guide.describe()}"
            )
        if not objective.uses_guide and not guide.is_model_guide:
            raise DGMError(f"{type(objective).__name__} fits the model alone and uses no guide; drop --guide")
        self.guide = guide.to(self.device)
        for m in objective.modules():
            m.to(self.device)
        self.params = self._collect_params()
        self._check_memory()
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=self.config.lr, eps=self.config.adam_eps)
        if self.config.grad_clip:  # every optimizer.step(), whichever objective calls it, sees clipped gradients
            self.optimizer.register_step_pre_hook(self._clip_gradients)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._record = None  # config.json and data.json, written by fit() where missing
        self._progress: Optional[dict] = None  # what fit() returned
        if self.run_dir is not None and not (self.run_dir / CONFIG).exists():
            try:
                self._record = run_record(model, data, objective, self.guide, self.config, self.evaluation)
            except DGMError as e:  # a Python-only run (a notebook's class, one's own tensors) still trains
                warnings.warn(
                    f"{self.run_dir} gets checkpoints, metrics and weights but no config.json, so `dgm` commands "
                    f"cannot load it: {e}",
                    DGMWarning,
                    stacklevel=2,
                )
        if self.run_dir is not None:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DGMError(
                    f"cannot create the run directory {self.run_dir}: {e.strerror}; choose another --run-dir"
                ) from None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.run_dir else None)
        self._best_model: Optional[dict] = None
        self._last_good: Optional[dict] = None  # without a run directory: the last checkpoint, in memory
        self._divergence_limit: Optional[float] = None
        self._resume_from: Optional[dict] = None  # the state a rollback restored
        self._last_val: Optional[float] = None  # the latest validation bound, for the epoch line

    def _clip_gradients(self, optimizer, args, kwargs) -> None:
        """Scale the gradients so that their global L2 norm is at most ``--grad-clip``."""
        nn.utils.clip_grad_norm_(self.params, self.config.grad_clip, foreach=True)

    def _set_learning_rate(self, step: int, steps_per_epoch: int, rollbacks: int) -> float:
        """The schedule's rate for ``step`` (``inference.lr_schedules``), lowered by
        ``ROLLBACK_LR_FACTOR`` per rollback: a function of the checkpointed step and rollback
        count alone, so a resumed run takes the same rates."""
        lr = learning_rate(self.config, step, steps_per_epoch) * ROLLBACK_LR_FACTOR**rollbacks
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)
        return lr

    def _check_memory(self) -> None:
        """Refuse, before allocating anything, a step that cannot fit: K x B x D values of
        the data's size per particle (log-likelihood terms, their gradients and the decoder's
        outputs, about ``STEP_VALUES_PER_DATUM`` of them) plus the parameters with their
        gradients and Adam's two moments, against the device's free memory."""
        batch = self.data.train.shape[0] if self.objective.full_batch else self.config.batch_size
        values = self.objective.num_particles * batch * self.model.data_spec.dim * STEP_VALUES_PER_DATUM
        values += 4 * sum(p.numel() for p in self.params)
        need = values * torch.finfo(self.model.dtype).bits // 8
        free = free_memory(self.device)
        if free is not None and need > free:
            per_particle = max(1, need // max(self.objective.num_particles, 1))
            raise DGMError(
                f"one training step needs about {need / 2**30:.1f} GiB (K={self.objective.num_particles} samples x "
                f"batch {batch} x {self.model.data_spec.dim} values, and the parameters), but {self.device} has "
                f"{free / 2**30:.1f} GiB free; use --k {max(1, free // per_particle)} or less, "
                "or a smaller --batch-size"
            )

    def _labels(self, model: GenerativeModel, data: DataSource) -> Dict[str, Tensor]:
        """The labels of every non-empty split, checked and on the device."""
        labels = {}
        for split in ("train", "val", "test"):
            x = getattr(data, split)
            if x is None or not x.shape[0]:
                continue
            y = getattr(data, f"{split}_labels")
            if y is None:
                raise DGMError(
                    f"{type(model).__name__} needs class labels, but the {split} data of "
                    f"{data.name} has none; use a labelled dataset "
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

    def _param_groups(self) -> List[dict]:
        """One optimizer group, or two where the guide declares its own learning rate (the
        local guide: each of its parameters sees one datapoint, once an epoch); a group's
        ``lr_factor`` scales the schedule's rate."""
        if self.guide.lr is None:
            return [{"params": self.params}]
        own = {id(p) for p in self.guide.parameters()}
        rest = [p for p in self.params if id(p) not in own]
        guide = [p for p in self.params if id(p) in own]
        groups = [{"params": rest}] if rest else []
        return groups + [{"params": guide, "lr_factor": self.guide.lr / self.config.lr}]

    def _collect_params(self) -> List[nn.Parameter]:
        modules = [self.model, self.guide] + self.objective.modules()
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not params:
            raise DGMError("nothing to train: the model, guide and objective have no parameters")
        return params

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.run_dir / CHECKPOINT if self.run_dir else None

    def _state(self, progress: dict) -> dict:
        return {
            "model": self.model.state_dict(),
            "guide": self.guide.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **progress,
        }

    def save_checkpoint(self, progress: dict) -> None:
        """Save the resumable state (to ``checkpoint.pt``, or in memory without a run
        directory); state with non-finite parameters is never saved: it is a divergence."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):  # one host sync
            raise _Diverged("a parameter became non-finite", progress["step"])
        if self.checkpoint_path is not None:
            _atomic_save(self._state(progress), self.checkpoint_path)
        else:
            self._last_good = _detached(self._state(progress))

    def _restore(self) -> Optional[dict]:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        return self._restore_state(load_state(path, self.device), path)

    def _restore_state(self, state: dict, path: Path) -> dict:
        self._load_weights(state, path)
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.metrics.truncate_after(state["step"])
        return state

    def _load_weights(self, state: dict, path: Path) -> None:
        """Model and guide weights from ``state`` (read from ``path``), refused in one line
        when they belong to another model or guide."""
        load_weights(self.model, self.guide, state, path)

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> Dict:
        """Train until ``epochs`` (or early stopping / ``max_steps``), resuming from a
        checkpoint in ``run_dir`` if there is one. Returns the training summary.

        A divergence (see ``DIVERGENCE_FACTOR``) rolls back to the last good checkpoint with
        the learning rate lowered, logged as a ``rollback`` record in ``metrics.jsonl``; after
        ``MAX_ROLLBACKS`` of them training stops with a one-line error."""
        with run_lock(self.run_dir):
            if self._record is not None:
                write_run_record(self.run_dir, self._record)
            while True:
                try:
                    self._progress = self._fit()
                    return self._progress
                except _Diverged as d:
                    self._roll_back(d)

    def _roll_back(self, d: "_Diverged") -> None:
        state = load_state(self.checkpoint_path, self.device) if self.checkpoint_path else self._last_good
        rollbacks = state.get("rollbacks", 0) + 1
        if rollbacks > MAX_ROLLBACKS:
            raise DGMError(
                f"training diverged ({d.what} at step {d.step}) again after {MAX_ROLLBACKS} rollbacks, each with "
                f"the learning rate x{ROLLBACK_LR_FACTOR:g}; start with a lower --lr (now {self.config.lr:g}), "
                "or check the data and the model's options"
            )
        self._restore_state(state, self.checkpoint_path or Path("in-memory checkpoint"))
        lr = None
        for group in self.optimizer.param_groups:
            group["lr"] *= ROLLBACK_LR_FACTOR
            lr = group["lr"]
        state["rollbacks"] = rollbacks
        record = {"step": state["step"], "split": "rollback", "reason": d.what, "at_step": d.step, "lr": lr}
        self.metrics.write(record)
        self._resume_from = state

    def _fit(self) -> Dict:
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
            "rollbacks": 0,
        }
        resumed, rolled_back = self._resume_from, self._resume_from is not None
        self._resume_from = None
        if resumed is None:
            resumed = self._restore()
        if resumed is not None:
            progress = {k: resumed.get(k, v) for k, v in progress.items()}
        if resumed is None or rolled_back:
            self.save_checkpoint(progress)  # the state to roll back to (with a lowered learning rate)
        n = self.data.train.shape[0]
        start = time.time() - progress["train_seconds"]
        last_ckpt = time.time()
        for epoch in range(progress["epoch"], cfg.epochs if not progress["done"] else 0):
            gen.set_state(progress["data_rng"])  # the epoch's data, reproducibly
            x_epoch = self.data.train_epoch(gen).to(self.device)
            perm = torch.randperm(n, generator=gen).to(self.device)
            batch_size = n if self.objective.full_batch else cfg.batch_size  # an EM step sees every datapoint
            num_batches = math.ceil(n / batch_size)
            sums, count = None, 0
            bar = tqdm(
                total=num_batches,
                initial=progress["batch"],
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not cfg.progress,
                leave=False,
                mininterval=2.0,
            )
            epoch_start, record = time.time(), None
            for b in range(progress["batch"], num_batches):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                lr = self._set_learning_rate(progress["step"], num_batches, progress["rollbacks"])
                terms = self._step(x_epoch[idx], idx, n, progress["step"])
                bar.update(1)  # (a counter that moves: iterating a tqdm updates its shown count lazily)
                progress["step"] += 1
                progress["batch"] = b + 1
                sums = {k: v for k, v in terms.items()} if sums is None else {k: sums[k] + v for k, v in terms.items()}
                count += 1
                last = b == num_batches - 1 or (cfg.max_steps is not None and progress["step"] >= cfg.max_steps)
                if progress["step"] % cfg.log_every == 0 or last:
                    record = self._log_train(progress["step"], epoch + (b + 1) / num_batches, sums, count, lr)
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
            if cfg.progress and record is not None:  # one line per epoch that stays on screen
                val = f", validation bound {self._last_val:.2f}" if self._last_val is not None else ""
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.epochs}: training bound {record['bound']:.2f}{val}, "
                    f"{time.time() - epoch_start:.1f} s"
                )
            if stop:
                break
        progress["done"] = True
        self.save_checkpoint(progress)
        best = self._best_model
        if self.run_dir is not None and (self.run_dir / BEST).exists():
            best = load_state(self.run_dir / BEST, self.device)
        if best is not None:
            self._load_weights(best, self.run_dir / BEST if self.run_dir else Path("best weights"))
        self.model.after_fit(self.data.train)
        if self.run_dir is not None:
            _atomic_save({"model": self.model.state_dict(), "guide": self.guide.state_dict()}, self.run_dir / FINAL)
        return progress

    def _step(self, x: Tensor, idx: Tensor, n: int, step: int) -> Dict[str, Tensor]:
        """One step of the objective on the minibatch ``x`` (rows ``idx`` of ``n``); returns
        the detached terms."""
        self.objective.set_step(step)
        conditions = self._conditions("train", idx)
        self.guide.before_step(self.model, x, idx, n, conditions)
        return self.objective.train_step(self.model, self.guide, x, idx, n, self.optimizer, conditions)

    def _log_train(
        self, step: int, epoch: float, sums: Dict[str, Tensor], count: int, lr: float
    ) -> Dict[str, float]:
        """Write the mean of the training terms since the last record; refuse a non-finite loss."""
        record = {k: float(v) / count for k, v in sums.items()}
        if not math.isfinite(record["loss"]):
            raise _Diverged(f"the loss became {record['loss']}", step)
        if self._divergence_limit is None:
            self._divergence_limit = DIVERGENCE_FACTOR * self._reference_loss(record["loss"])
        if record["loss"] > self._divergence_limit:
            raise _Diverged(f"the loss per datapoint reached {record['loss']:.4g} nats", step)
        self.metrics.write({"step": step, "epoch": epoch, "split": "train", **record, "lr": lr})
        return record

    def _reference_loss(self, first: float) -> float:
        """The loss scale divergence is measured against (see ``DIVERGENCE_FACTOR``)."""
        spec = self.model.data_spec
        if spec.support != "real":
            return spec.dim * math.log(2 if spec.support == "binary" else spec.num_levels)
        return max(abs(first), 1.0)

    def _validate(self, progress: dict) -> bool:
        """Record the validation bound; return True when early stopping says stop."""
        cfg = self.config
        if not cfg.validate or self.guide.refit_on_new_data or self.data.val is None:
            return False
        val = self.data.val.to(self.device)
        size = self.evaluation.batch_size
        with eval_mode(self.model, self.guide):
            bounds = [
                self.objective.validation_bound(
                    self.model,
                    self.guide,
                    val[i : i + size],
                    **self._conditions("val", slice(i, i + size)),
                )
                for i in range(0, val.shape[0], size)
            ]
        value = float(torch.cat(bounds).mean())
        self._last_val = value
        if not math.isfinite(value):
            raise _Diverged(f"the validation bound became {value}", progress["step"])
        self.metrics.write({"step": progress["step"], "epoch": progress["epoch"], "split": "val", "bound": value})
        if value > progress["best_val"]:
            progress["best_val"], progress["bad_epochs"] = value, 0
            best = {"model": self.model.state_dict(), "guide": self.guide.state_dict(), "epoch": progress["epoch"]}
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
        """log p(x) on held-out data (test set by default) with the configured estimator
        (``estimator``, ``k`` override ``self.evaluation``), plus the ELBO and active units
        (:func:`inference.evaluation.evaluate`). A model with labels needs ``labels`` of
        given ``data`` (for the test set they are the dataset's); it then reports log p(x | y)
        or log p(x, y)."""
        x = self.data.test if data is None else data
        conditions = self._conditions("test") if data is None else {}
        if self.model.uses_labels and data is not None:
            if labels is None:
                raise DGMError(f"{type(self.model).__name__} is evaluated with class labels: pass labels= for the data")
            self.model.check_labels(labels, x.shape[0], "evaluation labels")
            conditions = {"y": labels}
        overrides = {key: value for key, value in (("estimator", estimator), ("k", k)) if value is not None}
        result = evaluate(
            self.model,
            self.guide,
            x.to(self.device),
            replace(self.evaluation, **overrides),
            conditions={key: value.to(self.device) for key, value in conditions.items()},
            num_particles=self.objective.num_particles,
            train=self.config,
        )
        if data is None and self._progress is not None and self.run_dir and written_by_runner(self.run_dir):
            config = json.loads((self.run_dir / CONFIG).read_text())
            done = summary(config, self.data.name, self.guide.describe(), self._progress, str(self.device), result)
            write_json(self.run_dir / SUMMARY, done)  # a runner-written run: dgm compare reads it
        return result


def load_weights(model: nn.Module, guide: nn.Module, state: dict, path: Path) -> None:
    """Load ``state["model"]`` and ``state["guide"]`` into ``model`` and ``guide``; weights of
    another model or guide are refused in one line naming ``path``."""
    try:
        model.load_state_dict(state["model"])
        if state.get("guide"):
            guide.load_state_dict(state["guide"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise DGMError(
            f"{path} holds weights of another model or guide than this run's config describes ({first[:160]}); "
            "check config.json or delete the run directory"
        ) from None


def fit_local_guide(
    model: GenerativeModel,
    x: Tensor,
    num_particles: int = 1,
    config: Optional[TrainConfig] = None,
    epochs: int = 20,
    init_from=None,
    guide: Union[str, Guide] = "local",
    guide_options: Optional[Dict] = None,
) -> Guide:
    """Fit per-datapoint variational parameters on ``x`` with the model frozen (the
    held-out evaluation of a local guide, and the best-q half of the amortization gap):
    ``epochs`` epochs of the ELBO with ``num_particles`` samples and the optimizer settings
    of ``config``, the learning rate decayed to 0 by a cosine over the fit (the training
    run's schedule does not apply; a constant rate would leave its noise in the fitted q).
    ``guide``: the guide to fit (a fresh one built for ``x``), by default a local guide, built
    with ``guide_options`` (fields of ``GuideConfig``: its learning rate, initial scale,
    minibatch steps); without them it learns at ``config.lr`` with no minibatch steps."""
    from inference.objectives import ELBO

    config = config or TrainConfig()
    if guide_options is None:
        guide_options = {"local_lr": None, "local_steps": 0}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        cfg = replace(  # a fixed-length fit: the training run's schedule does not apply
            config,
            epochs=epochs,
            validate=False,
            max_steps=None,
            device=str(x.device),
            lr_schedule="cosine",
            lr_min=0.0,
        )
        runner = Runner(model, _Fixed(x), ELBO(num_particles), guide=guide, config=cfg, guide_options=guide_options)
        if init_from is not None:
            runner.guide.init_from(init_from, x)
        runner.fit()
        return runner.guide
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _Fixed:
    """A held-out tensor presented as a training set."""

    name = "the held-out data"
    dynamic = False
    source = None

    def __init__(self, x: Tensor):
        self.train, self.val, self.test = x, None, None

    def train_epoch(self, generator: torch.Generator) -> Tensor:
        return self.train


def _detached(state):
    """A copy of a (nested) state dict that later optimizer steps do not change."""
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    return state.detach().clone() if isinstance(state, Tensor) else state
