"""The ``dgm`` command: the only place that parses arguments.

    dgm list
    dgm train MODEL --data mnist --objective iwae --k 5 --guide amortized --epochs 20
    dgm eval RUN --estimator is --k 5000
    dgm eval RUN --estimator ais --steps 1000 --chains 16 --leapfrog 10 [--ais-start guide]
    dgm bdmc RUN --n 20 --steps 1000 --chains 16 [--leapfrog 10] [--seed 0]
    dgm gradvar RUN --objective NAME --k K [--n-estimates M]
    dgm gaps RUN [--limit N]
    dgm sample RUN [--n 64] [--out FILE] [--condition-on top-half]
    dgm score RUN --data ood:inverted
    dgm density RUN [--out FILE]
    dgm latent RUN --what interpolate|project|reconstruct|analogies|style [--out FILE]
    dgm fit-prior RUN --prior pixelcnn [--preset cpu] [--epochs N]
    dgm train RUN --more-epochs N
    dgm compare RUN [RUN ...]
    dgm report RUN [RUN ...] --out report.html
    dgm reproduce quickstart [--ais-check 100]

Errors a user can fix are printed as one line (``dgm: error: ...``), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from experiments.config import add_flags, config_from_args, read_config
from models.base import DGMError, DGMWarning

DEFAULT_RUNS = Path("runs")


class _Choices:
    """Argument choices read from ``module.attr`` only when argparse looks at them, so that
    building the parser imports no plotting library (``dgm --help`` and ``dgm list`` stay fast).
    Give the argument a ``metavar`` (and ``%(choices)s`` in its help): without one,
    ``add_argument`` lists the choices to format the usage line, which imports the module."""

    def __init__(self, module: str, attr: str):
        self.module, self.attr = module, attr

    def _values(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.attr)

    def __contains__(self, value) -> bool:
        return value in self._values()

    def __iter__(self):
        return iter(self._values())


def _check_writable(path: Optional[Path], flag: str = "--out") -> None:
    """Refuse an output path whose folder cannot be written, before any work is done."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DGMError(f"{flag} {path}: the folder {folder} does not exist or is not writable; choose another path")


class _DatasetChoices(list):
    """The registered datasets' names, which also admit a data file (``--data path.npz``;
    ``experiments.data.user`` reads it or says what is wrong with it)."""

    def __contains__(self, value) -> bool:
        from experiments.data import is_data_file

        return list.__contains__(self, value) or (isinstance(value, str) and is_data_file(value))


def _registry_choices() -> dict:
    """The flags whose values a registry lists."""
    from experiments.data import DATASETS
    from inference import ESTIMATORS, GUIDES, OBJECTIVES
    from models import MODELS

    return {
        "model": MODELS.names(),
        "data": _DatasetChoices(DATASETS.names()),
        "objective": OBJECTIVES.names(),
        "guide": GUIDES.names(),
        "eval_estimator": ["auto"] + ESTIMATORS.names(),
    }


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model name (see `dgm list`) or path/to/file.py:ClassName (a GenerativeModel); optional with --config",
    )
    p.add_argument("--config", type=Path, default=None, help="start from a run's config.json (flags change it)")
    add_flags(p, choices=_registry_choices())
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default runs/<model>-<data>-<objective>... and every setting that differs from the "
        "defaults); an existing one resumes",
    )
    p.add_argument(
        "--more-epochs",
        type=int,
        default=None,
        metavar="N",
        help="extend a finished run by N epochs: `dgm train RUN_DIR --more-epochs N` (bit-exact with a longer run)",
    )


def _add_loop_args(p: argparse.ArgumentParser) -> None:
    """The options of the training loop (``TrainConfig``), as ``fit-prior`` takes them."""
    add_flags(p, sections=("train",))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_config(a: argparse.Namespace):
    """``TrainConfig`` from the flags of ``_add_loop_args``."""
    config = config_from_args(a).train
    config.check()
    return config


def _config_from_args(a: argparse.Namespace):
    base = read_config(a.config) if a.config is not None else None
    config = config_from_args(a, base)
    if a.model is not None:
        config.model.name = a.model
    elif base is None:
        raise DGMError("name a model (`dgm train MODEL ...`, see `dgm list`) or give --config RUN/config.json")
    config.check()
    return config


def default_run_dir(config) -> Path:
    """``runs/`` and a name that shows every setting differing from the defaults
    (``experiments.run_names``)."""
    from experiments.run_names import run_name

    return DEFAULT_RUNS / run_name(config)


NAME_COLUMN = 24
"""``dgm list``: the widest name column; a longer name gets a line of its own."""


def plain(text: str) -> str:
    """A docstring's words without reStructuredText markup: ``:func:`x``` and ``x`` become
    x, ``:class:`~a.b.C``` becomes C."""
    import re

    text = re.sub(r":[a-z]+:`~([^`]*\.)?([^`.]+)`", r"\2", text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def _print_table(title: str, rows) -> None:
    """``title:`` then one entry per row: its name, and its description wrapped to the
    terminal with a hanging indent, so the descriptions stay aligned whatever the names."""
    import shutil
    import textwrap

    print(f"{title}:")
    width = min(max((len(name) for name, _ in rows), default=0), NAME_COLUMN) + 2
    columns = max(shutil.get_terminal_size((100, 24)).columns, 60)
    indent = " " * (2 + width)
    for name, doc in rows:
        lines = textwrap.wrap(plain(str(doc)), width=columns - len(indent)) or [""]
        if len(name) > width - 2:
            print(f"  {name}")
        else:
            print(f"  {name:{width}s}{lines.pop(0)}")
        for line in lines:
            print(indent + line)


def cmd_list(a) -> None:
    from experiments.data import DATASETS
    from experiments.reproduce import EXPERIMENTS
    from inference import ESTIMATORS, GUIDES, OBJECTIVES
    from models import MODELS

    models = []
    for entry in MODELS.entries():
        presets = entry.factory.presets
        models.append(
            (entry.name, entry.description + (f" (presets: {', '.join(sorted(presets))})" if presets else ""))
        )
    _print_table("models", models)
    own = ("FILE.npy|.npz|.csv", "your own data (--data-spec binary|categorical:K|real; see experiments.data.user)")
    _print_table("datasets", DATASETS.describe() + [own])
    _print_table("objectives (--objective)", OBJECTIVES.describe())
    _print_table("guides (--guide)", GUIDES.describe())
    estimators = []
    for entry in ESTIMATORS.entries():
        settings = ", ".join(f"--{s.replace('_', '-')}" for s in entry.factory.settings)
        estimators.append((entry.name, entry.description + (f" [settings: {settings}]" if settings else "")))
    _print_table("estimators (--estimator)", estimators)
    _print_table("experiments (dgm reproduce NAME)", EXPERIMENTS.describe())


def _existing_run(a: argparse.Namespace) -> Optional[Path]:
    """The run directory ``dgm train RUN_DIR`` names in the model's place, if it does."""
    if a.model is not None and (Path(a.model) / "config.json").is_file():
        return Path(a.model)
    return None


def cmd_train(a) -> None:
    from experiments.runs import describe_estimator, extend_run, format_number, run_outputs, train_run

    existing = _existing_run(a)
    if a.more_epochs is not None:
        run_dir = existing or a.run_dir
        if run_dir is None:
            raise DGMError("--more-epochs N extends a run: `dgm train RUN_DIR --more-epochs N`")
        summary = extend_run(run_dir, a.more_epochs)
    else:
        if existing is not None:  # `dgm train RUN_DIR`: resume (or re-report) the run as configured
            a.config, a.model, a.run_dir = existing / "config.json", None, a.run_dir or existing
        config = _config_from_args(a)
        run_dir = a.run_dir or default_run_dir(config)
        summary = train_run(config, run_dir)
    t = summary["test"]
    print(f"run: {run_dir}")
    print(
        f"test NLL {format_number(t['nll'], '.2f')} ± {format_number(t['nll_stderr'], '.2f')} nats "
        f"({describe_estimator(t)}, n={t['n']})"
        + (f", test ELBO {t['elbo']:.2f}" if t.get("elbo") is not None and t["elbo"] == t["elbo"] else "")
    )
    if t.get("warning"):
        print(f"warning: {t['warning']}")
    print("wrote: " + ", ".join(str(path) for path in run_outputs(run_dir)))


AIS_SETTINGS = ("steps", "chains", "leapfrog", "ais_start", "ais_schedule")
EVAL_SETTINGS = AIS_SETTINGS + ("global_samples",)
"""The ``EvalConfig`` fields ``dgm eval`` takes by their own names (``--steps``, ...,
``--global-samples`` of the nested estimator)."""


def _add_eval_settings(p: argparse.ArgumentParser, names) -> None:
    """Flags ``--NAME`` for the ``EvalConfig`` fields ``names``, with their help, type,
    choices and defaults."""
    import typing
    from dataclasses import fields

    from inference.config import EvalConfig

    hints = typing.get_type_hints(EvalConfig)
    for f in fields(EvalConfig):
        if f.name in names:
            choices = f.metadata.get("choices")
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=hints[f.name],
                default=f.default,
                choices=list(choices) if choices else None,
                help=f"{f.metadata['help']} (default: {f.default})",
            )


def cmd_eval(a) -> None:
    from experiments.runs import evaluate_run

    settings = {name: getattr(a, name) for name in EVAL_SETTINGS}
    result = evaluate_run(a.run, estimator=a.estimator, k=a.k, limit=a.limit, split=a.split, **settings)
    print(json.dumps(result, indent=2))


def cmd_bdmc(a) -> None:
    from experiments.runs import bdmc_run, format_number

    out, path, recorded = bdmc_run(
        a.run,
        a.n,
        steps=a.steps,
        chains=a.chains,
        leapfrog=a.leapfrog,
        schedule=a.ais_schedule,
        seed=a.seed,
        progress=not a.no_progress,
    )
    spread = format_number(out["gap_stderr"], ".3f")
    print(
        f"BDMC on {out['n']} points simulated from the model: mean log p(x) lower {out['lower']:.3f} (forward AIS), "
        f"upper {out['upper']:.3f} (reverse AIS), gap {out['gap']:.3f} ± {spread} nats "
        f"(T={a.steps}, C={a.chains}, L={a.leapfrog}, {a.ais_schedule}, seed {a.seed}); wrote {path}"
        + ("" if recorded else "; no summary.json (unfinished run): gap not recorded")
    )


def cmd_gradvar(a) -> None:
    from dataclasses import asdict

    from experiments.runs import gradvar_run

    settings = asdict(config_from_args(a).objective)
    name, k = settings.pop("name"), settings.pop("k")
    out, stem = gradvar_run(a.run, name, k, a.n_estimates, batch_size=a.batch_size, seed=a.seed, **settings)
    print(stem.with_suffix(".md").read_text().rstrip())
    print(f"wrote {stem}.md, .json and .png")


def cmd_gaps(a) -> None:
    from experiments.runs import gaps_run

    out, path = gaps_run(
        a.run,
        a.limit,
        k=a.k,
        steps=a.steps,
        chains=a.chains,
        elbo_samples=a.elbo_samples,
        refit_epochs=a.refit_epochs,
        refit_lr=a.refit_lr,
        seed=a.seed,
        progress=not a.no_progress,
    )
    print(
        f"{out['n']} test points: log p(x) {out['log_px']:.2f} ({out['log_px_method']}), "
        f"ELBO(q*) {out['elbo_best']:.2f}, ELBO(encoder) {out['elbo_encoder']:.2f}; "
        f"approximation gap {out['approximation']:.2f} "
        f"± {out['approximation_stderr']:.2f}, amortization gap {out['amortization']:.2f} "
        f"± {out['amortization_stderr']:.2f} nats; wrote {path}"
    )


def cmd_sample(a) -> None:
    from experiments.runs import load_run

    if a.n < 1:
        raise DGMError(f"--n must be >= 1, got {a.n}")
    _check_writable(a.out)
    run = load_run(a.run)
    if a.condition_on is not None:
        from experiments.plots import save_completions

        out = a.out or Path(a.run) / f"completions-{a.condition_on}.png"
        written = save_completions(
            run.model, run.data.spec, run.data.test[: a.images], out, a.condition_on, per_image=a.per_image
        )
    else:
        title = f"{Path(a.run).name} ({run.config.describe()})"
        written = run.data.samples.write(run.model, a.out, Path(a.run), n=a.n, title=title)
    print(f"wrote {written}")


def _score_data(run: Path, name: Optional[str], split: str):
    """The tensor ``dgm score`` scores: a dataset's split (the run's own dataset by
    default), or an OOD set made from the run's own test data (``ood:NAME``)."""
    from dataclasses import replace

    from experiments.runs import load_data

    config = read_config(Path(run) / "config.json")
    if name is not None and name.startswith("ood:"):
        from experiments.anomaly import ood_set

        return ood_set(name[4:], load_data(config.data, config.train.seed).test)
    own = replace(config.data, labelled=None)
    if name is not None:  # another dataset or file: none of the run's own file's record applies
        own = replace(own, name=name, spec=None, sha256=None)
    return getattr(load_data(own, config.train.seed), split)


def cmd_score(a) -> None:
    _check_writable(a.out)
    from experiments.runs import score_run

    if not (Path(a.run) / "config.json").exists():
        raise DGMError(f"{a.run} is not a run directory (no config.json); train one with `dgm train`")
    x = _score_data(a.run, a.data, a.split)
    if a.limit is not None:
        x = x[: a.limit]
    est = score_run(a.run, x, estimator=a.estimator, k=a.k)
    bits = -est.log_px / (math.log(2) * x[0].numel())
    tag = (a.data or "own-data").replace(":", "-").replace("/", "-")
    out = a.out or Path(a.run) / f"scores-{tag}-{a.split}.csv"
    tmp = Path(str(out) + ".tmp")
    with open(tmp, "w") as f:
        f.write("index,log_px,mc_stderr,bits_per_dim\n")
        for i, (lp, se, b) in enumerate(zip(est.log_px.tolist(), est.stderr.tolist(), bits.tolist())):
            f.write(f"{i},{lp:.6f},{se:.6f},{b:.6f}\n")
    tmp.replace(out)
    print(
        f"scored {len(x)} datapoints ({est.method}"
        + (f", K={est.num_samples}" if est.num_samples else "")
        + f"): mean log p(x) {float(est.log_px.mean()):.3f} nats, {float(bits.mean()):.4f} bits/dim; wrote {out}"
    )


def cmd_latent(a) -> None:
    from experiments.latent_tools import run_latent

    out = run_latent(
        a.run, a.what, a.out, n=a.n, site=a.site, method=a.method, steps=a.steps, pairs=a.pairs, images=a.images
    )
    print(f"wrote {out}")


def cmd_density(a) -> None:
    from experiments.density_plots import plot_run

    print(f"wrote {plot_run(a.run, a.out, split=a.split)}")


def cmd_fit_prior(a) -> None:
    from experiments.code_prior import fit_prior
    from experiments.config import parse_option

    options = dict(parse_option(o) for o in a.opt)
    summary = fit_prior(a.run, prior=a.prior, preset=a.preset, options=options, train=_train_config(a))
    print(json.dumps(summary, indent=2, default=str))


def cmd_compare(a) -> None:
    from experiments.runs import compare

    print(compare(a.runs))


def cmd_report(a) -> None:
    from experiments.report import write_report

    _check_writable(a.out)
    print(f"wrote {write_report(a.runs, a.out)}")


def cmd_reproduce(a) -> None:
    from experiments.reproduce import reproduce, written

    print(
        reproduce(
            a.name,
            out=a.out,
            device=a.device,
            tiny=a.tiny,
            protocol=a.protocol,
            ais_check=a.ais_check,
            ais_steps=a.ais_steps,
        )
    )
    print("wrote:\n" + "\n".join(f"  {line}" for line in written(a.name, a.out, a.tiny, a.protocol)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgm", description="pyro-dgm: deep generative models as Pyro programs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models, datasets, objectives, guides, estimators, experiments").set_defaults(
        fn=cmd_list
    )
    p = sub.add_parser("train", help="train a model (resumes an existing run directory)")
    _add_train_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="estimate log p(x) of a trained run")
    p.add_argument("run", type=Path)
    p.add_argument("--estimator", default="auto", choices=_registry_choices()["eval_estimator"])
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None, help="first N datapoints only")
    p.add_argument("--split", default="test", choices=["test", "val"])
    _add_eval_settings(p, EVAL_SETTINGS)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser(
        "bdmc",
        help="the BDMC gap of AIS on data simulated from a trained run (forward AIS lower, reverse AIS upper bound)",
    )
    p.add_argument("run", type=Path)
    p.add_argument("--n", type=int, default=20, help="datapoints to simulate from the model (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the simulation and both AIS runs (default: 0)")
    _add_eval_settings(p, ("steps", "chains", "leapfrog", "ais_schedule"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_bdmc)
    p = sub.add_parser(
        "gradvar", help="variance and SNR of an objective's gradient at a run's trained parameters (encoder, decoder)"
    )
    p.add_argument("run", type=Path)
    add_flags(p, sections=("objective",), choices={"objective": _registry_choices()["objective"]})
    p.add_argument("--n-estimates", type=int, default=100, help="independent gradient estimates M (default: 100)")
    p.add_argument("--batch-size", type=int, default=100, help="training rows of the minibatch (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seeds the minibatch's binarization and the samples")
    p.set_defaults(fn=cmd_gradvar)
    p = sub.add_parser("gaps", help="approximation and amortization gaps of a run on test points (Cremer et al. 2018)")
    p.add_argument("run", type=Path)
    p.add_argument("--limit", type=int, default=100, help="first N test points (default: 100)")
    p.add_argument("--k", type=int, default=5000, help="IS samples where log p(x) is neither exact nor AIS")
    p.add_argument("--elbo-samples", type=int, default=100, help="samples per ELBO estimate (default: 100)")
    p.add_argument("--refit-epochs", type=int, default=200, help="full-batch steps fitting q* (default: 200)")
    p.add_argument(
        "--refit-lr", type=float, default=0.05, help="Adam learning rate fitting q*, cosine-decayed (default: 0.05)"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_eval_settings(p, ("steps", "chains"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_gaps)
    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG")
    p.add_argument("run", type=Path)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--condition-on",
        default=None,
        choices=["top-half", "top-quarter"],
        help="complete test images from their known part (autoregressive models)",
    )
    p.add_argument("--images", type=int, default=8, help="with --condition-on: test images to complete")
    p.add_argument("--per-image", type=int, default=6, help="with --condition-on: completions per image")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("score", help="per-datapoint log p(x) and bits/dim of a dataset under a trained run (CSV)")
    p.add_argument("run", type=Path)
    p.add_argument(
        "--data",
        default=None,
        help="dataset or data file (default: the run's), or ood:noise|ood:inverted|ood:rotated|ood:digits-upsampled",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--estimator", default="auto", choices=_registry_choices()["eval_estimator"])
    p.add_argument("--k", type=int, default=1000, help="importance samples per datapoint (latent models)")
    p.add_argument("--limit", type=int, default=None, help="first N datapoints only")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default RUN/scores-DATA-SPLIT.csv)")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("latent", help="latent space of a trained run: interpolations, 2-D projection, reconstructions")
    p.add_argument("run", type=Path)
    p.add_argument(
        "--what",
        default="interpolate",
        choices=_Choices("experiments.latent_tools", "WHAT"),
        metavar="VIEW",
        help="one of: %(choices)s (analogies, style: cvae and m2)",
    )
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/latent-WHAT.png)")
    p.add_argument("--n", type=int, default=1000, help="project: test points to encode")
    p.add_argument("--site", default=None, help="project: latent site (default the guide's last)")
    p.add_argument("--method", default="slerp", choices=["slerp", "linear"], help="interpolate: path")
    p.add_argument("--steps", type=int, default=8, help="interpolate: decoded points per pair")
    p.add_argument("--pairs", type=int, default=4, help="interpolate: pairs of test points")
    p.add_argument("--images", type=int, default=20, help="reconstruct: test images; analogies: rows")
    p.set_defaults(fn=cmd_latent)
    p = sub.add_parser("density", help="density plot (PNG) of a 2-D run with exact log p(x), over its data")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/density.png)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="data drawn under it")
    p.set_defaults(fn=cmd_density)
    p = sub.add_parser("fit-prior", help="stage 2 of a vqvae run: fit a PixelCNN prior over its codes")
    p.add_argument("run", type=Path, help="a finished vqvae run directory")
    p.add_argument(
        "--prior",
        default="pixelcnn",
        choices=_Choices("experiments.code_prior", "PRIORS"),
        metavar="PRIOR",
        help="one of: %(choices)s",
    )
    p.add_argument("--preset", default=None, help="preset of the prior model (e.g. small, cpu)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="override one prior option")
    _add_loop_args(p)
    p.set_defaults(fn=cmd_fit_prior)
    p = sub.add_parser("compare", help="a table of finished runs")
    p.add_argument("runs", type=Path, nargs="+")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser(
        "report", help="one self-contained HTML page of runs: summary table, curves, samples, diagnostics"
    )
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML path (default: report.html)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("reproduce", help="run a named experiment end to end")
    p.add_argument("name")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a few steps of every run, to check the pipeline")
    p.add_argument(
        "--protocol",
        default="cpu",
        choices=["cpu", "paper"],
        help="cpu: the experiment's CPU budget (default); paper: the paper's own training protocol "
        "(mnist-iwae, mnist-vae2: Burda et al. 2016, 3,280 epochs, for a GPU)",
    )
    p.add_argument(
        "--ais-check",
        type=int,
        default=0,
        metavar="N",
        help="after the table, IS (the runs' K) against AIS on each run's first N test images, with the paired "
        "difference (default 0: off)",
    )
    from experiments.ais_check import AIS

    p.add_argument(
        "--ais-steps",
        type=int,
        default=None,
        metavar="T",
        help=f"the AIS check's T (default {AIS['steps']:,}; C = {AIS['chains']}, L = {AIS['leapfrog']})",
    )
    p.set_defaults(fn=cmd_reproduce)
    return parser


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """``dgm: warning: ...`` for the warnings a user can act on; others as Python formats them."""
    if issubclass(category, DGMWarning):
        return f"dgm: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    try:
        args.fn(args)
    except DGMError as e:
        print(f"dgm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave cannot be written or read
        where = f" {e.filename}" if e.filename else ""
        print(f"dgm: error: {e.strerror or e}:{where}; choose another path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgm: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
