"""Run directories: build a model, data and objective from one ``RunSpec``, train through
the runner, and read finished runs back.

A run directory holds ``config.json`` (the spec), ``metrics.jsonl``, ``checkpoint.pt``,
``best.pt`` (best validation weights), ``samples.png`` and ``summary.json``. Training into
an existing directory with the same spec resumes from its checkpoint; a different spec is
refused, so two experiments never mix in one directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from experiments import data as datasets
from experiments.labels import keep_labels
from experiments.plots import save_samples, save_text_samples
from inference.flow_guides import STEPS as FLOW_STEPS
from inference.objectives import make_objective
from inference.runner import Runner, TrainConfig
from inference.schedules import make_schedule
from models import REGISTRY
from models.base import DGMError, GenerativeModel


@dataclass
class RunSpec:
    """Everything that defines a run; written to ``config.json``."""

    model: str = "vae"
    preset: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)  # overrides of the model config
    data: str = "mnist-embedded"
    binarization: str = "dynamic"
    split: str = "59600/400"
    objective: str = "elbo"  # elbo | elbo-sf | iwae
    k: int = 1
    analytic_kl: bool = False
    baseline: str = "average"  # elbo-sf: none | average | neural
    kl_warmup: int = 0  # KL annealing: steps of linear warm-up of beta from kl_beta0 to 1 (0: none)
    kl_beta0: float = 0.0
    free_bits: float = 0.0  # free bits: nats floor per group of latent units (0: none)
    free_bits_per: str = "site"  # site | dimension
    guide: str = "amortized"  # amortized | local | iaf | planar | radial
    flow_depth: int = 2  # flow guides: number of steps
    flow_hidden: Optional[int] = None  # flow guides: hidden width (default max(16, 4 * latent size))
    labelled: Optional[int] = None  # semi-supervised (m2): keep this many training labels, balanced; the rest -1
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "RunSpec":
        d = dict(d)
        known = {f.name for f in fields(TrainConfig)}
        d["train"] = TrainConfig(**{k: v for k, v in d.get("train", {}).items() if k in known})
        return RunSpec(**d)


def build_model(spec: RunSpec, data_spec) -> GenerativeModel:
    if spec.model not in REGISTRY:
        raise DGMError(f"unknown model {spec.model!r}; `dgm list` shows the models ({', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[spec.model]
    config = None
    if cls.config_class is not None:
        if spec.preset is not None and spec.preset not in cls.presets:
            raise DGMError(f"unknown preset {spec.preset!r} for {spec.model}; choose from {sorted(cls.presets)}")
        config = cls.presets[spec.preset] if spec.preset else cls.config_class()
        valid = {f.name: f for f in fields(cls.config_class)}
        for key in spec.options:
            if key not in valid:
                raise DGMError(f"{spec.model} has no option {key!r}; options: {', '.join(valid)}")
        config = replace(config, **spec.options)
    elif spec.options or spec.preset:
        raise DGMError(f"{spec.model} takes no options or presets")
    return cls(data_spec, config)


def build(spec: RunSpec, run_dir: Optional[Path] = None) -> Tuple[Runner, Any]:
    """Data, model, objective and runner for ``spec``."""
    data = datasets.load(spec.data, binarization=spec.binarization, split=spec.split, seed=spec.train.seed)
    if spec.labelled is not None:
        kept = keep_labels(data.train_labels, spec.labelled, seed=spec.train.seed)
        data = replace(data, train_labels=kept, info={**data.info, "labelled": spec.labelled})
    torch.manual_seed(spec.train.seed)
    model = build_model(spec, data.spec)
    if model.objectives is not None and spec.objective not in model.objectives:
        raise DGMError(
            f"{spec.model} trains correctly only with --objective {' or '.join(model.objectives)}, not {spec.objective}"
        )
    if spec.labelled is not None and not model.accepts_unlabelled:
        raise DGMError(f"{spec.model} does not learn from unlabelled data; a label budget is for m2")
    schedule = make_schedule(spec.kl_warmup, spec.kl_beta0, spec.free_bits, spec.free_bits_per)
    objective = make_objective(
        spec.objective,
        spec.k,
        analytic_kl=spec.analytic_kl,
        baseline=spec.baseline,
        input_dim=data.spec.dim,
        schedule=schedule,
    )
    flow = {"flow_depth": spec.flow_depth, "flow_hidden": spec.flow_hidden} if spec.guide in FLOW_STEPS else {}
    runner = Runner(model, data, objective, guide=spec.guide, config=spec.train, run_dir=run_dir, guide_options=flow)
    return runner, data


def _finite(obj):
    """``obj`` with every non-finite float replaced by ``None``: strict JSON (no NaN or
    Infinity tokens) that every JSON reader accepts; ``None`` reads as "not available"."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


# Fields that change what is logged or where it runs, not what is computed: a run may resume with
# other values (a CPU run finished on a GPU; bit-for-bit equality then holds per device only).
_DISPLAY_ONLY = ("progress", "log_every", "checkpoint_seconds", "device")


def _defining(spec_json: dict) -> dict:
    """A spec without its display-only fields: two specs that agree here are the same run."""
    train = {k: v for k, v in spec_json.get("train", {}).items() if k not in _DISPLAY_ONLY}
    return {**spec_json, "train": train}


def _with_defaults(spec_json: dict) -> dict:
    """An older ``config.json`` with the fields added since filled in at their defaults
    (which reproduce the old behaviour), so its run still resumes."""
    try:
        return json.loads(json.dumps(RunSpec.from_json(spec_json).to_json(), default=str))
    except TypeError:  # fields this version does not know: compare as written
        return spec_json


def train_run(spec: RunSpec, run_dir: Path) -> dict:
    """Train (or resume) the run in ``run_dir``, evaluate it and write ``summary.json``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if config_path.exists():
        old = _with_defaults(json.loads(config_path.read_text()))
        if _defining(old) != _defining(json.loads(json.dumps(spec.to_json(), default=str))):
            raise DGMError(
                f"{run_dir} holds a run with a different configuration; choose another --run-dir "
                "or delete it (resuming needs the same command)"
            )
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and _done(run_dir):
            return json.loads(summary_path.read_text())  # finished and evaluated: nothing to redo
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(config_path, spec.to_json())
    runner, data = build(spec, run_dir)
    t0 = time.time()
    progress = runner.fit()
    summary = {
        "model": spec.model,
        "preset": spec.preset,
        "data": data.describe(),
        "objective": spec.objective,
        "k": spec.k,
        "guide": spec.guide + (f" x{spec.flow_depth}" if spec.guide in FLOW_STEPS else ""),
        "kl_schedule": _describe_schedule(spec),
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "train_seconds": round(progress["train_seconds"], 2),
        "device": str(runner.device),
        "best_val_bound": progress["best_val"],
        "test": runner.evaluate(),
        "wall_seconds": round(time.time() - t0, 2),
    }
    if hasattr(runner.model, "classify") and data.test_labels is not None:  # m2: its classifier q(y | x)
        from models.latent.m2 import accuracy

        summary["test"]["accuracy"] = accuracy(runner.model, data.test.to(runner.device), data.test_labels)
    if "alphabet" in data.info:  # END-padded strings: the per-character view, and text samples
        from models.autoregressive.sequence import nats_per_char, num_symbols

        if runner.model.has_exact_log_prob:
            summary["test"]["nats_per_char"] = nats_per_char(runner.model, data.test.to(runner.device))
            summary["val_nats_per_char"] = nats_per_char(runner.model, data.val.to(runner.device))
        else:  # a latent-variable model: the estimated test NLL over the symbols of the same names
            test = data.test[: summary["test"]["n"]]
            symbols = float(num_symbols(test.reshape(len(test), -1)).sum())
            summary["test"]["nats_per_char"] = summary["test"]["nll"] * len(test) / symbols
            summary["test"]["nats_per_char_estimated"] = True
        save_text_samples(runner.model, data.info["alphabet"], run_dir / "samples.txt")
    elif data.spec.image_shape is not None or data.spec.dim == 2:
        n = 64 if data.spec.image_shape is not None else 2000  # a grid of images, or a 2-D scatter
        save_samples(runner.model, data.spec, run_dir / "samples.png", n=n)
    if data.spec.dim == 2 and runner.model.has_exact_log_prob:  # 2-D densities: the density itself
        from experiments.density_plots import save_density_plot

        title = f"{spec.model}" + (f"[{spec.preset}]" if spec.preset else "") + f" on {spec.data}"
        save_density_plot(runner.model, run_dir / "density.png", data=data.train[:20_000].cpu(), title=title)
    if spec.data == "mnist-logit" and summary["test"]["estimator"] == "exact":  # pixel-space bits/dim
        summary["test"]["bits_per_dim"] = _logit_bits_per_dim(summary["test"]["nll"], data.test, runner.config)
    elif "levels" in data.info:  # dequantized levels on [0, 1]: bits/dim of the discrete levels
        d, levels = data.spec.dim, data.info["levels"]
        summary["test"]["bits_per_dim"] = (summary["test"]["nll"] + d * math.log(levels)) / (d * math.log(2))
    _write_json(run_dir / "summary.json", summary)
    return _finite(summary)  # as written: NaN and infinities are None


def _logit_bits_per_dim(nll: float, test, config: TrainConfig) -> float:
    """Mean bits/dim in pixel space of the evaluated test points, from their mean NLL in logit
    space (``models.flows.logit_bits_per_dim`` is linear in log p, so means commute)."""
    from models.flows import logit_bits_per_dim

    y = test if config.eval_limit is None else test[: config.eval_limit]
    return float(logit_bits_per_dim(torch.full((y.shape[0],), -nll, dtype=torch.float64), y.double()).mean())


def _describe_schedule(spec: RunSpec) -> str:
    parts = [f"KL warm-up {spec.kl_warmup} steps from {spec.kl_beta0:g}"] if spec.kl_warmup else []
    parts += [f"free bits {spec.free_bits:g} per {spec.free_bits_per}"] if spec.free_bits else []
    return ", ".join(parts) or "-"


def load_run(run_dir: Path) -> Tuple[RunSpec, Runner, Any]:
    """Rebuild a finished (or interrupted) run with its latest weights."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise DGMError(f"{run_dir} is not a run directory (no config.json); train one with `dgm train`")
    spec = RunSpec.from_json(json.loads((run_dir / "config.json").read_text()))
    runner, data = build(spec, run_dir)
    if (run_dir / "checkpoint.pt").exists() and _done(run_dir):
        runner.fit()  # returns at once for a finished run, with its best validation weights
    else:
        _load_weights(runner, run_dir)
    return spec, runner, data


def _done(run_dir: Path) -> bool:
    return bool(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False).get("done"))


def _load_weights(runner: Runner, run_dir: Path) -> None:
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise DGMError(f"{run_dir} has no checkpoint yet; train it first")
    state = torch.load(path, map_location=runner.device, weights_only=False)
    runner.model.load_state_dict(state["model"])
    if runner.guide_module is not None and state.get("guide") is not None:
        runner.guide_module.load_state_dict(state["guide"])


def evaluate_run(
    run_dir: Path, estimator: str = "auto", k: int = 1000, limit: Optional[int] = None, split: str = "test"
) -> dict:
    spec, runner, data = load_run(run_dir)
    runner.config = replace(runner.config, eval_limit=limit)
    x = getattr(data, split)
    labels = getattr(data, f"{split}_labels") if runner.model.uses_labels else None
    result = runner.evaluate(x, estimator=estimator, k=k, labels=labels)
    result["split"] = split
    name = f"eval_{result['estimator']}_K{result['K']}_{split}{'' if limit is None else f'_n{limit}'}.json"
    _write_json(Path(run_dir) / name, result)
    return result


def score_run(run_dir: Path, x: torch.Tensor, estimator: str = "auto", k: int = 1000, progress: bool = True):
    """Per-datapoint ``log p(x)`` of the trained run on ``x``: an :class:`Estimate` (exact
    where the model has it, else importance sampling with the run's amortized guide)."""
    from inference.estimators import estimate_dataset
    from inference.runner import eval_mode

    spec, runner, data = load_run(run_dir)
    runner.model.check_data(x, "scored data")
    method = ("exact" if runner.model.has_exact_log_prob else "is") if estimator == "auto" else estimator
    if method != "exact" and spec.guide != "amortized":
        raise DGMError(
            f"{run_dir} has a {spec.guide} guide, which cannot score new data; use --estimator exact or naive, "
            "or train with --guide amortized"
        )
    with eval_mode(runner.model, runner.guide_module):
        return estimate_dataset(
            runner.model,
            x.to(runner.device),
            method=method,
            num_samples=k,
            guide=runner.guide if method == "is" else None,
            batch_size=runner.config.eval_batch_size,
            progress=progress,
        )


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


COLUMNS = [
    ("model", lambda s: s["model"] + (f"[{s['preset']}]" if s.get("preset") else "")),
    ("objective", lambda s: f"{s['objective']}" + (f" K={s['k']}" if s["objective"] == "iwae" else "")),
    ("guide", lambda s: s["guide"]),
    ("epochs", lambda s: str(s["epochs"])),
    ("train s", lambda s: f"{s['train_seconds']:.0f}"),
    ("test NLL", lambda s: " ± ".join(format_number(s["test"][key], ".2f") for key in ("nll", "nll_stderr"))),
    ("estimator", lambda s: s["test"]["estimator"] + (f" K={s['test']['K']}" if s["test"]["K"] else "")),
    ("test ELBO", lambda s: format_number(s["test"].get("elbo"), ".2f")),
    ("KL schedule", lambda s: s.get("kl_schedule", "-")),
    ("active units", lambda s: _units(s["test"].get("active_units"))),
    ("test acc", lambda s: f"{s['test']['accuracy']:.1%}" if "accuracy" in s["test"] else "-"),
    ("bits/dim", lambda s: f"{s['test']['bits_per_dim']:.3f}" if "bits_per_dim" in s["test"] else "-"),
    ("nats/char", lambda s: f"{s['test']['nats_per_char']:.3f}" if "nats_per_char" in s["test"] else "-"),
    ("k-hat>0.7", lambda s: f"{s['test']['khat_frac_above_0.7']:.1%}" if (s["test"]["K"] or 0) > 1 else "-"),
]


def compare(run_dirs: List[Path]) -> str:
    """A Markdown table of finished runs' summaries."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            raise DGMError(f"{d} has no summary.json; is the run finished?")
        rows.append(json.loads(path.read_text()))
    cells = [[f(s) for _, f in COLUMNS] for s in rows]
    keep = [j for j in range(len(COLUMNS)) if any(row[j] != "-" for row in cells)]  # no all-empty columns
    header = "| run | " + " | ".join(COLUMNS[j][0] for j in keep) + " |"
    lines = [header, "|" + "---|" * (len(keep) + 1)]
    for d, row in zip(run_dirs, cells):
        lines.append(f"| {Path(d).name} | " + " | ".join(row[j] for j in keep) + " |")
    data_lines = sorted({s["data"] for s in rows})
    return "\n".join(lines) + "\n\nData: " + "; ".join(data_lines) + "\n"
