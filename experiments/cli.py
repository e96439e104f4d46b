"""The ``dgm`` command: the only place that parses arguments.

    dgm list
    dgm train MODEL --data mnist --objective iwae --k 5 --guide amortized --epochs 20
    dgm eval RUN --estimator is --k 5000
    dgm sample RUN [--n 64] [--out FILE] [--condition-on top-half]
    dgm score RUN --data ood:inverted
    dgm density RUN [--out FILE]
    dgm latent RUN --what interpolate|project|reconstruct|analogies|style [--out FILE]
    dgm fit-prior RUN --prior pixelcnn [--preset cpu] [--epochs N]
    dgm compare RUN [RUN ...]
    dgm reproduce quickstart

Errors a user can fix are printed as one line (``dgm: error: ...``), not a traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

from experiments.latent_tools import WHAT as LATENT_VIEWS
from inference.guides import GUIDES
from inference.objectives import OBJECTIVES
from models.base import DGMError

DEFAULT_RUNS = Path("runs")


def parse_option(text: str):
    if "=" not in text:
        raise DGMError(f"--opt expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key, parsed


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from inference.runner import TrainConfig

    d = TrainConfig()
    p.add_argument("model", help="model name (see `dgm list`)")
    p.add_argument("--data", default="mnist-embedded", help="dataset name (see `dgm list`)")
    p.add_argument("--binarization", default="dynamic", choices=["dynamic", "static", "none"])
    p.add_argument("--split", default="59600/400", choices=["59600/400", "50000/10000"])
    p.add_argument("--preset", default=None, help="named model configuration (see `dgm list`)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one model option, e.g. --opt latent_dim=20 (repeatable)",
    )
    p.add_argument("--objective", default="elbo", choices=list(OBJECTIVES))
    p.add_argument("--k", type=int, default=1, help="samples per datapoint in the objective")
    p.add_argument("--analytic-kl", action="store_true", help="closed-form KL in the ELBO where available")
    p.add_argument(
        "--baseline",
        default="average",
        choices=["none", "average", "neural"],
        help="baseline of the score-function ELBO",
    )
    p.add_argument("--kl-warmup", type=int, default=0, help="KL annealing: steps to warm beta up to 1 (0: off)")
    p.add_argument("--kl-beta0", type=float, default=0.0, help="KL annealing: beta at step 0")
    p.add_argument("--free-bits", type=float, default=0.0, help="free bits: nats floor per latent group (0: off)")
    p.add_argument("--free-bits-per", default="site", choices=["site", "dimension"], help="free bits groups")
    p.add_argument(
        "--guide",
        default="amortized",
        choices=list(GUIDES),
        help="amortized encoder, local (per-datapoint) parameters, or the encoder pushed through a flow",
    )
    p.add_argument(
        "--labelled", type=int, default=None, help="semi-supervised (m2): keep N training labels, class-balanced"
    )
    p.add_argument("--flow-depth", type=int, default=2, help="flow guides: number of flow steps")
    p.add_argument("--flow-hidden", type=int, default=None, help="flow guides: hidden width")
    _add_loop_args(p)
    p.add_argument("--eval-estimator", default="auto", choices=["auto", "exact", "naive", "is"])
    p.add_argument("--eval-k", type=int, default=d.eval_k, help="samples per test point for log p(x)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test points")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default runs/<model>-<data>-<objective>...); an existing one resumes",
    )


def _add_loop_args(p: argparse.ArgumentParser) -> None:
    """The options of the training loop (``TrainConfig``), shared by ``train`` and ``fit-prior``."""
    from inference.runner import TrainConfig

    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--patience", type=int, default=None, help="early stopping after this many bad epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=d.checkpoint_seconds,
        help="checkpoint at least this often (and at every epoch end)",
    )
    p.add_argument("--no-progress", action="store_true")


def _train_config(a: argparse.Namespace, **evaluation):
    """``TrainConfig`` from the loop options of ``_add_loop_args`` (plus evaluation settings)."""
    from inference.runner import TrainConfig

    return TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        device=a.device,
        patience=a.patience,
        max_steps=a.max_steps,
        log_every=a.log_every,
        checkpoint_seconds=a.checkpoint_seconds,
        progress=not a.no_progress,
        **evaluation,
    )


def _spec_from_args(a: argparse.Namespace):
    from experiments.runs import RunSpec

    train = _train_config(a, eval_estimator=a.eval_estimator, eval_k=a.eval_k, eval_limit=a.eval_limit)
    return RunSpec(
        model=a.model,
        preset=a.preset,
        options=dict(parse_option(o) for o in a.opt),
        data=a.data,
        binarization=a.binarization,
        split=a.split,
        objective=a.objective,
        k=a.k,
        analytic_kl=a.analytic_kl,
        baseline=a.baseline,
        kl_warmup=a.kl_warmup,
        kl_beta0=a.kl_beta0,
        free_bits=a.free_bits,
        free_bits_per=a.free_bits_per,
        guide=a.guide,
        flow_depth=a.flow_depth,
        flow_hidden=a.flow_hidden,
        labelled=a.labelled,
        train=train,
    )


def default_run_dir(spec) -> Path:
    k = f"{spec.k}" if spec.k > 1 or spec.objective == "iwae" else ""
    preset = f"-{spec.preset}" if spec.preset else ""
    return DEFAULT_RUNS / f"{spec.model}{preset}-{spec.data}-{spec.objective}{k}-{spec.guide}-s{spec.train.seed}"


def cmd_list(a) -> None:
    from experiments.data import DATASETS
    from experiments.reproduce import EXPERIMENTS
    from inference.estimators import METHODS
    from models import REGISTRY

    print("models:")
    for name, cls in sorted(REGISTRY.items()):
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
        presets = f" (presets: {', '.join(sorted(cls.presets))})" if cls.presets else ""
        print(f"  {name:12s} {doc}{presets}")
    print("datasets:")
    for name, doc in DATASETS.items():
        print(f"  {name:14s} {doc}")
    print("objectives:")
    for name, doc in OBJECTIVES.items():
        print(f"  {name:12s} {doc}")
    print(f"guides:      {', '.join(GUIDES)}")
    print(f"estimators:  {', '.join(METHODS)}")
    print("experiments (dgm reproduce NAME):")
    for name, exp in EXPERIMENTS.items():
        print(f"  {name:12s} {exp.description}")


def cmd_train(a) -> None:
    from experiments.runs import format_number, train_run

    spec = _spec_from_args(a)
    run_dir = a.run_dir or default_run_dir(spec)
    summary = train_run(spec, run_dir)
    t = summary["test"]
    print(f"run: {run_dir}")
    print(
        f"test NLL {format_number(t['nll'], '.2f')} ± {format_number(t['nll_stderr'], '.2f')} nats "
        f"({t['estimator']}, K={t['K']}, n={t['n']})"
        + (f", test ELBO {t['elbo']:.2f}" if t.get("elbo") is not None and t["elbo"] == t["elbo"] else "")
    )


def cmd_eval(a) -> None:
    from experiments.runs import evaluate_run

    result = evaluate_run(a.run, estimator=a.estimator, k=a.k, limit=a.limit, split=a.split)
    print(json.dumps(result, indent=2))


def cmd_sample(a) -> None:
    import torch

    from experiments.plots import save_samples
    from experiments.runs import load_run
    from inference.runner import eval_mode

    _, runner, data = load_run(a.run)
    if a.condition_on is not None:
        from experiments.plots import save_completions

        out = a.out or Path(a.run) / f"completions-{a.condition_on}.png"
        save_completions(runner.model, data.spec, data.test[: a.images], out, a.condition_on, per_image=a.per_image)
    elif data.name == "speech":  # audio: a WAV file
        from experiments.speech import write_wav

        out = a.out or Path(a.run) / "samples.wav"
        with eval_mode(runner.model), torch.no_grad():
            write_wav(out, runner.model.sample(1).reshape(-1).cpu(), data.spec.num_levels, data.info["rate"])
    elif "alphabet" in data.info:  # strings (names): text, not pictures
        from experiments.plots import save_text_samples

        out = a.out or Path(a.run) / "samples.txt"
        save_text_samples(runner.model, data.info["alphabet"], out, n=a.n)
        print(out.read_text(), end="")
    else:
        out = a.out or Path(a.run) / "samples.png"
        save_samples(runner.model, data.spec, out, n=a.n)
    print(f"wrote {out}")


def _score_data(run: Path, name: Optional[str], split: str):
    """The tensor ``dgm score`` scores: a dataset's split (the run's own dataset by
    default), or an OOD set made from the run's own test data (``ood:NAME``)."""
    from experiments import data as datasets
    from experiments.runs import RunSpec

    spec = RunSpec.from_json(json.loads((Path(run) / "config.json").read_text()))
    options = dict(binarization=spec.binarization, split=spec.split, seed=spec.train.seed)
    if name is not None and name.startswith("ood:"):
        from experiments.anomaly import ood_set

        return ood_set(name[4:], datasets.load(spec.data, **options).test)
    return getattr(datasets.load(name or spec.data, **options), split)


def cmd_score(a) -> None:
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

    options = dict(parse_option(o) for o in a.opt)
    summary = fit_prior(a.run, prior=a.prior, preset=a.preset, options=options, train=_train_config(a))
    print(json.dumps(summary, indent=2, default=str))


def cmd_compare(a) -> None:
    from experiments.runs import compare

    print(compare(a.runs))


def cmd_reproduce(a) -> None:
    from experiments.reproduce import reproduce

    print(reproduce(a.name, out=a.out, device=a.device, tiny=a.tiny))


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
    p.add_argument("--estimator", default="auto", choices=["auto", "exact", "naive", "is"])
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None, help="first N datapoints only")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.set_defaults(fn=cmd_eval)
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
        help="dataset name (default: the run's), or ood:noise|ood:inverted|ood:rotated|ood:digits-upsampled",
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--estimator", default="auto", choices=["auto", "exact", "naive", "is"])
    p.add_argument("--k", type=int, default=1000, help="importance samples per datapoint (latent models)")
    p.add_argument("--limit", type=int, default=None, help="first N datapoints only")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default RUN/scores-DATA-SPLIT.csv)")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("latent", help="latent space of a trained run: interpolations, 2-D projection, reconstructions")
    p.add_argument("run", type=Path)
    p.add_argument("--what", default="interpolate", choices=list(LATENT_VIEWS), help="analogies, style: cvae and m2")
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
    from experiments.code_prior import PRIORS

    p = sub.add_parser("fit-prior", help="stage 2 of a vqvae run: fit a PixelCNN prior over its codes")
    p.add_argument("run", type=Path, help="a finished vqvae run directory")
    p.add_argument("--prior", default="pixelcnn", choices=PRIORS)
    p.add_argument("--preset", default=None, help="preset of the prior model (e.g. small, cpu)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="override one prior option")
    _add_loop_args(p)
    p.set_defaults(fn=cmd_fit_prior)
    p = sub.add_parser("compare", help="a table of finished runs")
    p.add_argument("runs", type=Path, nargs="+")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("reproduce", help="run a named experiment end to end")
    p.add_argument("name")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a few steps of every run, to check the pipeline")
    p.set_defaults(fn=cmd_reproduce)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except DGMError as e:
        print(f"dgm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgm: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
