"""Run directories: build a model, data and objective from one ``RunConfig``, train through
the runner, and read finished runs back without training.

A run directory holds ``config.json`` (the :class:`~experiments.config.RunConfig`),
``metrics.jsonl``, ``checkpoint.pt`` (resumable state), ``best.pt`` (best validation
weights), ``final.pt`` (the weights training ended on), ``data.json`` (the data's spec and
size, so a run loads without its data), samples and ``summary.json``. Training into an
existing directory with the same config resumes from its checkpoint; a different config is
refused with the settings that differ, so two experiments never mix in one directory.

Python API::

    run = load_run("runs/vae-digits-elbo-amortized-s0")   # no training, no data pass
    model = load_model("runs/vae-digits-elbo-amortized-s0")  # the model alone
    run.model, run.guide                                  # trained weights, eval-ready
    evaluate(run.model, run.guide, x, EvalConfig(estimator="is", k=5000))
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from experiments import data as datasets
from experiments.config import DataConfig, ModelConfig, RunConfig, defining, differences, read_config
from experiments.curves import save_curves
from experiments.data import user as user_data
from experiments.labels import keep_labels
from experiments.run_names import fully_observed
from inference.config import EvalConfig, from_dict
from inference.device import resolve_device
from inference.evaluation import evaluate
from inference.guides import Guide, build_guide
from inference.objective import make_objective
from inference.rundir import finite as _finite
from inference.rundir import write_json
from inference.runner import BEST, CHECKPOINT, FINAL, Runner, free_memory, load_state, load_weights
from models.base import DataSpec, DGMError, DGMWarning, GenerativeModel, NoSampler
from models.loading import canonical_reference, model_label, resolve_model, warn_if_changed

PathLike = Union[str, Path]


def build_model(config: ModelConfig, data_spec: DataSpec) -> GenerativeModel:
    """The model ``config`` names (a registered name or ``path/to/file.py:ClassName``, see
    ``models.loading``), with its preset and options, for data of ``data_spec``."""
    cls = resolve_model(config.name)
    model_config = None
    if cls.config_class is not None:
        if config.preset is not None and config.preset not in cls.presets:
            raise DGMError(f"unknown preset {config.preset!r} for {config.name}; choose from {sorted(cls.presets)}")
        model_config = cls.presets[config.preset] if config.preset else cls.config_class()
        valid = {f for f in model_config.__dataclass_fields__}
        for key in config.options:
            if key not in valid:
                raise DGMError(f"{config.name} has no option {key!r}; options: {', '.join(valid)}")
        options = {key: _as_field(getattr(model_config, key), value) for key, value in config.options.items()}
        model_config = replace(model_config, **options)
    elif config.options or config.preset:
        raise DGMError(f"{config.name} takes no options or presets")
    _check_model_size(cls, data_spec, model_config, config)
    try:
        return _construct(cls, data_spec, model_config)
    except (TypeError, ValueError, ZeroDivisionError) as e:  # options of the wrong type or range
        raise DGMError(f"{config.name} cannot be built with options {config.options}: {e}") from None


def _as_field(default, value):
    """An option read back from JSON in the type of its field: a list as a tuple where the
    field holds a tuple (JSON has no tuples)."""
    return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value


def _construct(cls, data_spec: DataSpec, model_config) -> GenerativeModel:
    """``cls(data_spec)``, or ``cls(data_spec, model_config)`` for a model with a ``config_class``."""
    return cls(data_spec) if cls.config_class is None else cls(data_spec, model_config)


def _check_model_size(cls, data_spec: DataSpec, model_config, config: ModelConfig) -> None:
    """Refuse a model whose parameters (with their gradients and Adam's two moments) would
    not fit in free memory, before allocating them: the model is first built on the
    ``meta`` device, which allocates nothing (and with the random state restored after it)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the probe draws no one's numbers
            probe = _construct(cls, data_spec, model_config)
    except Exception:  # options of the wrong type or range: the real build says what is wrong
        return
    values = sum(t.numel() for t in probe.parameters()) * 4 + sum(t.numel() for t in probe.buffers())
    need, free = values * 4, free_memory(torch.device("cpu"))
    if free is not None and need > free:
        raise DGMError(
            f"{config.name} with options {config.options} has {values // 4:,} parameters, about {need / 2**30:.1f} GiB "
            f"to train, but this machine has {free / 2**30:.1f} GiB free; choose smaller options"
        )


def load_data(config: DataConfig, seed: int):
    """The dataset of a run (with its label budget applied); a data file that changed since
    the run recorded its SHA-256 is loaded with a warning."""
    data = datasets.load(config.name, binarization=config.binarization, split=config.split, seed=seed, spec=config.spec)
    if config.sha256 is not None:
        user_data.warn_if_changed(config.name, config.sha256, "the run's config.json")
    if config.labelled is not None:
        kept = keep_labels(data.train_labels, config.labelled, seed=seed)
        source = {**data.source, "labelled": config.labelled}
        data = replace(data, train_labels=kept, info={**data.info, "labelled": config.labelled}, source=source)
    return data


def with_sources(config: RunConfig) -> RunConfig:
    """``config`` with a model file and a data file named by their absolute paths and
    recorded with their SHA-256 (what ``config.json`` holds); registered names unchanged."""
    name, sha = canonical_reference(config.model.name)
    model = replace(config.model, name=name, sha256=sha)
    data = config.data
    if config.data.name not in datasets.DATASETS and user_data.is_data_file(config.data.name):
        path = user_data.resolve_file(config.data.name)
        data = replace(config.data, name=str(path), sha256=user_data.file_sha256(path))
    return replace(config, model=model, data=data)


def build(config: RunConfig, run_dir: Optional[Path] = None, data=None) -> Tuple[Runner, Any]:
    """Data, model, objective, guide and runner for ``config`` (everything checked before
    anything is trained or written)."""
    config.check()
    resolve_device(config.train.device)
    data = data if data is not None else load_data(config.data, config.train.seed)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, data.spec)
    if model.objectives is not None and config.objective.name not in model.objectives:
        raise DGMError(
            f"{config.model.name} trains correctly only with --objective {' or '.join(model.objectives)}, "
            f"not {config.objective.name}"
        )
    if config.data.labelled is not None and not model.accepts_unlabelled:
        raise DGMError(f"{config.model.name} does not learn from unlabelled data; a label budget is for m2")
    objective = make_objective(config.objective, data.spec)
    guide = build_guide(config.guide, model, data.train)
    runner = Runner(model, data, objective, guide, config=config.train, run_dir=run_dir, evaluation=config.eval)
    return runner, data


def _as_json(config: RunConfig) -> dict:
    return json.loads(json.dumps(config.to_json(), default=str))


def train_run(config: RunConfig, run_dir: PathLike) -> dict:
    """Train (or resume) the run in ``run_dir``, evaluate it and write ``summary.json``."""
    run_dir = Path(run_dir)
    config = with_sources(config)
    config_path = run_dir / "config.json"
    if config_path.exists():
        recorded = read_config(config_path)
        warn_if_changed(recorded.model.name, recorded.model.sha256, str(config_path))  # resuming on an edited file
        if recorded.data.sha256 is not None:
            user_data.warn_if_changed(recorded.data.name, recorded.data.sha256, str(config_path))
        old = defining(_as_json(recorded))
        new = defining(_as_json(config))
        if old != new:
            raise DGMError(
                f"{run_dir} holds a run with a different configuration ({'; '.join(differences(old, new))}); "
                "choose another --run-dir or delete it (resuming needs the same command)"
            )
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and (run_dir / FINAL).exists():
            return json.loads(summary_path.read_text())  # finished and evaluated: nothing to redo
    runner, data = build(config, run_dir)  # refuses a bad config before config.json is written
    write_json(config_path, config.to_json())
    write_json(run_dir / "data.json", {"spec": data.spec.to_json(), "num_train": int(data.train.shape[0])})
    t0 = time.time()
    progress = runner.fit()
    summary = {
        "model": model_label(config.model.name),
        "preset": config.model.preset,
        "data": data.describe(),
        **_fit_labels(config, runner),
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "train_seconds": round(progress["train_seconds"], 2),
        "device": str(runner.device),
        "best_val_bound": progress["best_val"],
        "test": runner.evaluate(),
        "wall_seconds": round(time.time() - t0, 2),
    }
    # the model's own metrics (M2: accuracy) are over the whole test set, as before the eval limit
    summary["test"].update(runner.model.report(data.test.to(runner.device), data.test_labels))
    extra = data.report(runner.model, summary, data.test)
    summary["test"].update(extra.pop("test", {}))
    summary.update(extra)
    write_json(run_dir / "summary.json", summary)  # first: a failing picture loses no result
    try:
        data.write_run_outputs(runner.model, run_dir, title=f"{run_dir.name} ({config.describe()})")
    except NoSampler as e:
        warnings.warn(f"no samples.png: {e}", DGMWarning, stacklevel=2)
    save_curves(run_dir)
    return _finite(summary)  # as written: NaN and infinities are None


def _fit_labels(config: RunConfig, runner: Runner) -> dict:
    """What the summary says of the fit: objective, K, guide and KL schedule; none of them
    for a fully observed model, which fits log p(x) itself (``experiments.run_names``)."""
    if fully_observed(config):
        return {}
    return {
        "objective": config.objective.name,
        "k": config.objective.k,
        "guide": runner.guide.describe(),
        "kl_schedule": _describe_schedule(config),
    }


RUN_FILES = (
    "summary.json",
    "curves.png",
    "samples.png",
    "samples.txt",
    "density.png",
    "metrics.jsonl",
    "config.json",
    "final.pt",
    "checkpoint.pt",
)
"""What a run directory holds, in the order ``dgm train`` lists what it wrote."""


def run_outputs(run_dir: PathLike) -> List[Path]:
    """The files of ``RUN_FILES`` that ``run_dir`` holds."""
    return [Path(run_dir) / name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def extend_run(run_dir: PathLike, more_epochs: int) -> dict:
    """``dgm train RUN --more-epochs N``: train a finished run ``N`` epochs more, from its
    checkpoint (the last step's weights, optimizer, data generator and RNG states), and
    evaluate it again. The result is bit for bit the run trained with ``epochs + N`` from
    the start (same machine), for the schedules whose rates do not depend on the run's
    length; ``cosine`` and ``burda`` do, and are refused (train a new run instead). A run
    that stopped at ``--max-steps`` is refused too."""
    from inference.lr_schedules import extendable
    from inference.runner import reopen_checkpoint

    run_dir = Path(run_dir)
    if more_epochs is None or more_epochs < 1:
        raise DGMError(f"--more-epochs must be >= 1, got {more_epochs}")
    config = read_config(run_dir / "config.json")
    train = config.train
    if not extendable(train):
        raise DGMError(
            f"{run_dir} uses --lr-schedule {train.lr_schedule}, whose rates depend on the run's length: more "
            f"epochs would change the rates it already trained with; train a new run with --epochs "
            f"{train.epochs + more_epochs} instead"
        )
    if train.max_steps is not None:
        raise DGMError(
            f"{run_dir} was limited by --max-steps {train.max_steps}; train a new run without it to extend it"
        )
    if not (run_dir / CHECKPOINT).exists():
        raise DGMError(f"{run_dir} has no checkpoint; train it first (`dgm train`)")
    reopen_checkpoint(run_dir / CHECKPOINT)
    for name in ("summary.json", FINAL):  # no longer the run's result
        (run_dir / name).unlink(missing_ok=True)
    longer = replace(config, train=replace(train, epochs=train.epochs + more_epochs))
    write_json(run_dir / "config.json", longer.to_json())
    return train_run(longer, run_dir)


def _describe_schedule(config: RunConfig) -> str:
    o = config.objective
    parts = [f"KL warm-up {o.kl_warmup} steps from {o.kl_beta0:g}"] if o.kl_warmup else []
    parts += [f"free bits {o.free_bits:g} per {o.free_bits_per}"] if o.free_bits else []
    return ", ".join(parts) or "-"


@dataclass
class Run:
    """A run directory's trained model and guide (restored without training, optimizer or
    data pass; the data is read only when ``data`` is asked for)."""

    dir: Path
    config: RunConfig
    model: GenerativeModel
    guide: Guide
    device: torch.device
    finished: bool

    @cached_property
    def data(self):
        return load_data(self.config.data, self.config.train.seed)


def _data_spec(run_dir: Path, config: RunConfig) -> Tuple[DataSpec, int]:
    """The data's spec and training-set size, from ``data.json`` (or, for runs written
    before it existed, from the data)."""
    path = run_dir / "data.json"
    if path.exists():
        try:
            info = json.loads(path.read_text())
            return DataSpec.from_json(info["spec"]), int(info["num_train"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DGMError(f"{path} is damaged ({e}); delete it (it is rebuilt from the data)") from None
    data = load_data(config.data, config.train.seed)
    return data.spec, int(data.train.shape[0])


def load_run(run_dir: PathLike, device: Optional[str] = None) -> Run:
    """Restore a finished (or interrupted) run: its final weights (best validation weights
    after ``after_fit``), or the latest checkpoint of an unfinished run. ``device``
    overrides the run's own (``auto``: CUDA where available)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise DGMError(f"{run_dir} is not a run directory (no config.json); train one with `dgm train`")
    config = read_config(run_dir / "config.json")
    target = resolve_device(device or config.train.device)
    spec, num_train = _data_spec(run_dir, config)
    warn_if_changed(config.model.name, config.model.sha256, f"{run_dir / 'config.json'}")
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, spec)
    placeholder = spec.placeholder(num_train)  # guides are sized on the data's shape alone
    guide = build_guide(config.guide, model, placeholder)
    path, finished = _weights_path(run_dir)
    load_weights(model, guide, load_state(path), path)
    model.to(target).eval()
    guide.to(target).eval()
    return Run(run_dir, config, model, guide, target, finished)


def load_model(run_dir: PathLike, device: Optional[str] = None) -> GenerativeModel:
    """The trained model of a run directory, in eval mode, without training or data:
    ``load_run(run_dir, device).model``."""
    return load_run(run_dir, device).model


def _weights_path(run_dir: Path) -> Tuple[Path, bool]:
    """``(file, finished)``: the weights training ended on, or the latest checkpoint of an
    unfinished run (runs finished before ``final.pt`` existed: their best weights)."""
    if (run_dir / FINAL).exists():
        return run_dir / FINAL, True
    if not (run_dir / CHECKPOINT).exists():
        raise DGMError(f"{run_dir} has no checkpoint yet; train it first (`dgm train`)")
    done = bool(load_state(run_dir / CHECKPOINT).get("done"))
    if done and (run_dir / BEST).exists():
        return run_dir / BEST, True
    return run_dir / CHECKPOINT, done


def evaluate_run(
    run_dir: PathLike,
    estimator: str = "auto",
    k: int = 1000,
    limit: Optional[int] = None,
    split: str = "test",
    **settings,
) -> dict:
    """``dgm eval``: estimate log p(x) of the run on ``split``; written to
    ``RUN/eval_<estimator>_<settings>_<split>[_n<limit>].json``. ``settings``: other
    ``EvalConfig`` fields (the AIS ``steps``, ``chains``, ...)."""
    if split not in ("test", "val"):
        raise DGMError(f"unknown split {split!r}; use test or val")
    run = load_run(run_dir)
    settings.update(estimator=estimator, k=k, limit=limit, batch_size=run.config.eval.batch_size)
    config = from_dict(EvalConfig, settings, "dgm eval")
    x, conditions = split_data(run, split)
    result = evaluate(
        run.model,
        run.guide,
        x,
        config,
        conditions=conditions,
        num_particles=run.config.objective.k,
        train=run.config.train,
    )
    result["split"] = split
    settings = "".join(f"_{key}{value}" for key, value in result["settings"].items()) or "_K0"
    name = f"eval_{result['estimator']}{settings}_{split}{'' if limit is None else f'_n{limit}'}.json"
    write_json(Path(run_dir) / name, result)
    return result


def split_data(run: Run, split: str = "test") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(x, conditions)``: the run's ``split`` rows and the model's conditions on them (the
    labels, for a model that uses them), on the run's device."""
    x = getattr(run.data, split)
    conditions = {"y": getattr(run.data, f"{split}_labels")} if run.model.uses_labels else {}
    return x.to(run.device), {key: value.to(run.device) for key, value in conditions.items()}


def score_run(run_dir: PathLike, x: torch.Tensor, estimator: str = "auto", k: int = 1000, progress: bool = True):
    """Per-datapoint ``log p(x)`` of the trained run on ``x``: an :class:`Estimate` (exact
    where the model has it, else importance sampling with the run's guide)."""
    from inference.estimators import estimate_dataset, make_estimator

    run = load_run(run_dir)
    run.model.check_data(x, "scored data")
    est = make_estimator(EvalConfig(estimator=estimator, k=k, batch_size=run.config.eval.batch_size), run.model)
    if est.uses_guide and run.guide.refit_on_new_data:
        raise DGMError(
            f"{run_dir} has a {run.guide.describe()} guide, which cannot score new data; use --estimator exact or "
            "naive, or train with --guide amortized"
        )
    return estimate_dataset(
        run.model, x.to(run.device), guide=run.guide, batch_size=est.config.batch_size, progress=progress, estimator=est
    )


# --- comparing runs ---------------------------------------------------------------------------
def format_number(value, fmt: str) -> str:
    """``value`` formatted, or "-" where it is missing (``None``, NaN: not available)."""
    return "-" if value is None or value != value else format(value, fmt)


def _units(value) -> str:
    """Active units: a count, or per latent site with the total (``h1 46 + h2 0 = 46``)."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        sites = {k: v for k, v in value.items() if k != "total"}
        return " + ".join(f"{k} {v}" for k, v in sites.items()) + f" = {value.get('total', sum(sites.values()))}"
    return str(value)


def describe_estimator(test: dict) -> str:
    """``is K=1000``: the estimator and its settings, from a summary's ``test`` section."""
    settings = test.get("settings")
    if settings is None:  # summaries written before estimators declared their settings
        settings = {"K": test["K"]} if test.get("K") else {}
    return " ".join([test["estimator"]] + [f"{key}={value}" for key, value in settings.items()])


COLUMNS = [
    ("model", lambda s: s["model"] + (f"[{s['preset']}]" if s.get("preset") else "")),
    ("objective", lambda s: _objective(s)),
    ("guide", lambda s: s.get("guide") or "-"),
    ("epochs", lambda s: str(s["epochs"])),
    ("train s", lambda s: f"{s['train_seconds']:.0f}"),
    ("test NLL", lambda s: " ± ".join(format_number(s["test"][key], ".2f") for key in ("nll", "nll_stderr"))),
    ("estimator", lambda s: describe_estimator(s["test"])),
    ("test ELBO", lambda s: format_number(s["test"].get("elbo"), ".2f")),
    ("KL schedule", lambda s: s.get("kl_schedule", "-")),
    ("active units", lambda s: _units(s["test"].get("active_units"))),
    ("test acc", lambda s: f"{s['test']['accuracy']:.1%}" if "accuracy" in s["test"] else "-"),
    ("bits/dim", lambda s: f"{s['test']['bits_per_dim']:.3f}" if "bits_per_dim" in s["test"] else "-"),
    ("nats/char", lambda s: f"{s['test']['nats_per_char']:.3f}" if "nats_per_char" in s["test"] else "-"),
    ("k-hat>0.7", lambda s: f"{s['test']['khat_frac_above_0.7']:.1%}" if (s["test"].get("K") or 0) > 1 else "-"),
    ("AIS accept", lambda s: format_number(s["test"].get("accept_mean"), ".2f")),
    ("chains' stderr", lambda s: _trusted(s["test"], "mc_stderr_mean", ".3f")),
    ("BDMC gap", lambda s: _bdmc(s.get("bdmc"))),
]


def _objective(s: dict) -> str:
    """``iwae K=5``; "-" for a fully observed model's run (no objective in its summary)."""
    if not s.get("objective"):
        return "-"
    return s["objective"] + (f" K={s['k']}" if s["k"] > 1 or s["objective"] == "iwae" else "")


def _trusted(test: dict, field: str, fmt: str) -> str:
    """A trust figure, where the summary's estimator declares it one."""
    return format_number(test.get(field), fmt) if field in test.get("trust", ()) else "-"


def _bdmc(bdmc: Optional[dict]) -> str:
    """The BDMC gap a run's AIS number was checked with, and its settings."""
    if not bdmc:
        return "-"
    return f"{bdmc['gap']:.2f} (T={bdmc['steps']}, C={bdmc['chains']}, n={bdmc['n']})"


def compare(run_dirs: List[Path]) -> str:
    """A Markdown table of finished runs' summaries."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            raise DGMError(f"{d} has no summary.json; is the run finished?")
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise DGMError(f"{path} is not valid JSON ({e}); rerun `dgm train` on the run to rewrite it") from None
    cells = [[f(s) for _, f in COLUMNS] for s in rows]
    keep = [j for j in range(len(COLUMNS)) if any(row[j] != "-" for row in cells)]  # no all-empty columns
    header = "| run | " + " | ".join(COLUMNS[j][0] for j in keep) + " |"
    lines = [header, "|" + "---|" * (len(keep) + 1)]
    for d, row in zip(run_dirs, cells):
        lines.append(f"| {Path(d).name} | " + " | ".join(row[j] for j in keep) + " |")
    data_lines = sorted({s["data"] for s in rows})
    return "\n".join(lines) + "\n\nData: " + "; ".join(data_lines) + "\n"


# --- BDMC -------------------------------------------------------------------------------------
def bdmc_run(
    run_dir: PathLike,
    n: int,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    schedule: str = "sigmoid",
    seed: int = 0,
    progress: bool = False,
) -> Tuple[dict, Path, bool]:
    """``dgm bdmc``: the BDMC gap (``inference.bdmc``) of the run's model on ``n`` points it
    simulates (seeded by ``seed``), written to ``RUN/bdmc_T{steps}_C{chains}_n{n}.json`` and
    recorded under ``"bdmc"`` in the run's ``summary.json`` (where the run has one). Returns
    ``(result, path written, recorded in summary.json)``."""
    from inference.bdmc import bdmc, check_settings

    check_settings(n, steps, chains, leapfrog, schedule)
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = None
    if summary_path.exists():  # read before the work: a damaged summary is refused first
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            raise DGMError(
                f"{summary_path} is not valid JSON ({e}); rerun `dgm train` on the run to rewrite it"
            ) from None
    run = load_run(run_dir)
    torch.manual_seed(seed)
    result = bdmc(
        run.model,
        n,
        steps=steps,
        chains=chains,
        leapfrog=leapfrog,
        schedule_name=schedule,
        batch_size=run.config.eval.batch_size,
        progress=progress,
    )
    out = {"model": run.config.model.name, "seed": seed, **result.to_json()}
    path = run_dir / f"bdmc_T{steps}_C{chains}_n{n}.json"
    write_json(path, out)
    if summary is not None:
        summary["bdmc"] = {key: out[key] for key in ("steps", "chains", "leapfrog", "schedule", "seed", "n")}
        summary["bdmc"].update({key: out[key] for key in ("gap", "gap_stderr", "lower", "upper")}, file=path.name)
        write_json(summary_path, summary)
    return out, path, summary is not None


# --- gradient variance and inference gaps (issue 13) ----------------------------------------
def _minibatch(run: Run, batch_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The first ``batch_size`` rows of one (seeded) binarization of the run's training set,
    their indices and the training-set size."""
    data = run.data
    x = data.train_epoch(torch.Generator().manual_seed(seed)) if data.dynamic else data.train
    n = x.shape[0]
    if batch_size < 1:
        raise DGMError(f"--batch-size must be >= 1, got {batch_size}")
    rows = torch.arange(min(batch_size, n))
    return x[rows].to(run.device), rows.to(run.device), n


def gradvar_run(
    run_dir: PathLike,
    objective: str,
    k: int = 1,
    n_estimates: int = 100,
    *,
    batch_size: int = 100,
    seed: int = 0,
    plot: bool = True,
    **objective_settings,
) -> Tuple[dict, Path]:
    """``dgm gradvar``: variance and SNR of ``objective``'s gradient (``inference.gradvar``)
    at the run's trained parameters, on the first ``batch_size`` training rows, per group
    (encoder, decoder); written to ``RUN/gradvar_<objective>_K<k>.{json,md,png}``."""
    from inference.config import ObjectiveConfig
    from inference.gradvar import gradient_estimates, gradient_stats, parameter_groups, plot_snr

    run = load_run(run_dir)
    config = replace(ObjectiveConfig(), name=objective, k=k, **objective_settings)
    obj = make_objective(config, run.data.spec)
    obj.check(run.model)
    for m in obj.modules():
        m.to(run.device)
    x, idx, n = _minibatch(run, batch_size, seed)
    conditions = {"y": run.data.train_labels[idx.cpu()].to(run.device)} if run.model.uses_labels else {}
    torch.manual_seed(seed)
    groups = parameter_groups(run.model, run.guide, x, **conditions)
    # one untimed pair of estimates first, so that the time per estimate leaves out warm-up
    gradient_estimates(obj, run.model, run.guide, x, groups, 2, idx=idx, size=n, conditions=conditions)
    torch.manual_seed(seed)
    start = time.time()
    estimates = gradient_estimates(
        obj, run.model, run.guide, x, groups, n_estimates, idx=idx, size=n, conditions=conditions,
        progress=run.config.train.progress,
    )  # fmt: skip
    seconds = (time.time() - start) / n_estimates
    stats = gradient_stats(estimates)
    out = {
        "objective": config.describe(),
        "k": k,
        "n_estimates": n_estimates,
        "batch_size": int(x.shape[0]),
        "seed": seed,
        "seconds_per_estimate": seconds,
        "snr": "mean over the group's parameters of |mean| / std of the M estimates (Rainforth et al. 2018)",
        "groups": {g: s.to_json() for g, s in stats.items()},
    }
    stem = Path(run_dir) / f"gradvar_{objective}_K{k}"
    write_json(stem.with_suffix(".json"), out)
    lines = [
        f"Gradient of {config.describe()} (loss per datapoint), {n_estimates} estimates on {out['batch_size']} "
        "training rows, at the run's trained parameters:",
        "",
        "| group | parameters | mean SNR | median SNR | mean variance | mean squared mean |",
        "|---|---|---|---|---|---|",
    ]
    for s in stats.values():
        lines.append(
            f"| {s.group} | {s.parameters} | {s.snr:.4g} | {s.snr_median:.4g} | {s.variance:.4g} | {s.mean_sq:.4g} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if plot:
        plot_snr(stats, stem.with_suffix(".png"), title=f"{Path(run_dir).name}: {config.describe()}")
    return out, stem


def gaps_run(
    run_dir: PathLike,
    limit: int = 100,
    *,
    k: int = 5000,
    steps: int = 1000,
    chains: int = 16,
    elbo_samples: int = 100,
    refit_epochs: int = 200,
    refit_lr: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> Tuple[dict, Path]:
    """``dgm gaps``: the approximation and amortization gaps (``inference.gaps``) of the run
    on its first ``limit`` test points, per datapoint and on average, written to
    ``RUN/gaps_n<limit>.json``. ``k`` is IS's sample count, ``steps`` / ``chains`` AIS's."""
    from inference.gaps import inference_gaps

    if limit < 1:
        raise DGMError(f"--limit must be >= 1, got {limit}")
    run = load_run(run_dir)
    x = run.data.test[:limit].to(run.device)
    run.model.check_data(x, "test data")
    torch.manual_seed(seed)
    evaluation = replace(run.config.eval, k=k, steps=steps, chains=chains, limit=None)
    gaps = inference_gaps(
        run.model,
        run.guide,
        x,
        log_px=evaluation,
        elbo_samples=elbo_samples,
        refit_epochs=refit_epochs,
        refit_lr=refit_lr,
        train=run.config.train,
        progress=progress,
    )
    out = {"guide": run.guide.describe(), "seed": seed, **gaps.to_json()}
    path = Path(run_dir) / f"gaps_n{limit}.json"
    write_json(path, out)
    return out, path
