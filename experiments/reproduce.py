"""Named, reproducible experiments: ``dgm reproduce NAME`` trains every run of the
experiment (resuming any that were interrupted), evaluates them and writes
``results.md``, the table the README quotes.

* ``quickstart``: the IWAE paper's one-layer VAE on the embedded binarized-MNIST subset,
  trained with the ELBO and with IWAE (K = 5); test NLL by importance sampling, K = 1,000.
  A few minutes on 2 CPU cores; needs no download.
* ``mnist-iwae``: the same architecture on dynamically binarized full MNIST (59,600/400
  split), 20 epochs with ``elbo`` and ``iwae --k 5``, 10 with ``iwae --k 50``; test NLL by
  importance sampling with K = 5,000 on all 10,000 test images (Burda et al. 2016, Table 1,
  trained for 3,280 epochs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from experiments.runs import RunSpec, compare, train_run
from inference.runner import TrainConfig
from models.base import DGMError


@dataclass
class Experiment:
    """``runs`` are trained into ``OUT/<run name>``, or into ``OUT/../<shares>/<run name>``
    when the experiment reuses another experiment's runs; ``report`` (if any) turns the
    run directories into more Markdown after the standard table."""

    description: str
    runs: List[Tuple[str, RunSpec]]
    notes: str
    shares: Optional[str] = None
    report: Optional[Callable[[List[Path], bool], str]] = None


ANOMALY_N = 2_000  # MNIST test images scored, and the size of each OOD set


def anomaly_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """ROC AUC of MNIST test images against each OOD set, scored by each run's log p(x)."""
    import torch

    from experiments import data as datasets
    from experiments.anomaly import OOD_SETS, ood_set, roc_auc
    from experiments.runs import RunSpec, score_run

    n = 50 if tiny else ANOMALY_N
    lines = [
        "| run | mean log p(x) (MNIST test) | " + " | ".join(f"AUC {s}" for s in OOD_SETS) + " |",
        "|---|---|" + "---|" * len(OOD_SETS),
    ]
    for d in run_dirs:
        spec = RunSpec.from_json(json.loads((Path(d) / "config.json").read_text()))
        test = datasets.load(spec.data, binarization=spec.binarization, split=spec.split, seed=spec.train.seed).test
        test = test[:n]
        inside = score_run(d, test, progress=False).log_px
        aucs = []
        for name in OOD_SETS:
            outside = score_run(d, ood_set(name, test), progress=False).log_px
            aucs.append(roc_auc(inside, outside))
        lines.append(
            f"| {Path(d).name} | {float(torch.as_tensor(inside).mean()):.2f} | "
            + " | ".join(f"{a:.4f}" for a in aucs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _vae(data: str, objective: str, k: int, epochs: int, eval_k: int, **train) -> RunSpec:
    return RunSpec(
        model="vae",
        preset="iwae-1layer",
        data=data,
        binarization="dynamic",
        objective=objective,
        k=k,
        train=TrainConfig(epochs=epochs, batch_size=100, lr=1e-3, eval_k=eval_k, **train),
    )


def _ar(model: str, preset: Optional[str], epochs: int, **train) -> RunSpec:
    """A fully observed model on dynamically binarized MNIST; test NLL is exact."""
    return RunSpec(
        model=model,
        preset=preset,
        data="mnist",
        binarization="dynamic",
        train=TrainConfig(epochs=epochs, batch_size=100, lr=1e-3, **train),
    )


EXPERIMENTS = {
    "quickstart": Experiment(
        "VAE (784-200-200-50) on embedded binarized MNIST: ELBO vs IWAE K=5; IS K=1000",
        [
            ("vae-elbo", _vae("mnist-embedded", "elbo", 1, 50, 1000)),
            ("vae-iwae5", _vae("mnist-embedded", "iwae", 5, 50, 1000)),
        ],
        "Data: the embedded subset (4,500 train / 500 val / 1,000 test, statically binarized "
        "once, fixed seed). Test NLL: importance sampling with the trained encoder as proposal, "
        "K = 1,000 per test image, ± the standard error over test images.",
    ),
    "mnist-iwae": Experiment(
        "VAE (784-200-200-50) on dynamically binarized MNIST: ELBO and IWAE K=5 (20 epochs), "
        "IWAE K=50 (10 epochs); IS K=5000",
        [
            ("vae-elbo", _vae("mnist", "elbo", 1, 20, 5000)),
            ("vae-iwae5", _vae("mnist", "iwae", 5, 20, 5000)),
            ("vae-iwae50", _vae("mnist", "iwae", 50, 10, 5000)),
        ],
        "Data: MNIST, dynamic binarization (train resampled every epoch; test binarized once, "
        "seed 1), 59,600/400 split. Test NLL: importance sampling, K = 5,000, all 10,000 test "
        "images. Burda et al. (2016) report 86.76 / 85.54 / 84.78 after 3,280 epochs.",
    ),
    "mnist-ar": Experiment(
        "Autoregressive models on dynamically binarized MNIST: exact test NLL",
        [
            ("fvsbn", _ar("fvsbn", None, 50)),
            ("nade", _ar("nade", "mnist", 3)),
            ("made-1mask", _ar("made", "mnist-1mask", 15)),
            ("made-8masks", _ar("made", "mnist-8masks", 10)),
            ("pixelcnn", _ar("pixelcnn", "cpu", 2)),
            ("gated-pixelcnn", _ar("gated_pixelcnn", "cpu", 1)),
        ],
        "Data: MNIST, dynamic binarization (train resampled every epoch; test binarized once, "
        "seed 1), 59,600/400 split; the best-validation weights are evaluated. Test NLL is exact "
        "(sum of the conditionals) on all 10,000 test images. Published (BENCHMARKS.md): FVSBN "
        "96.58-97.45, NADE 85.65-88.33, MADE 84.87-88.40 (Germain et al. 2015: 88.40 with 1 mask, "
        "86.64 with 32 masks and 2 hidden layers), PixelCNN 81.30-81.45, Gated PixelCNN 81.50. The "
        "PixelCNNs here are the small `cpu` presets.",
    ),
    "mnist-logit": Experiment(
        "Real-valued density models on dequantized MNIST in logit space (MAF paper setup)",
        [
            ("rnade", RunSpec(model="rnade", preset="mnist", data="mnist-logit", train=TrainConfig(epochs=1))),
        ],
        "Data: MNIST pixels dequantized with uniform noise (fixed seed), scaled to [lambda, 1 - lambda] "
        "with lambda = 1e-6 and mapped through the logit (Papamakarios et al. 2017); 59,600/400 split. "
        "Test log-likelihood in nats in logit space = -(test NLL). MAF paper: MADE MoG -1038.5, "
        "Real NVP(5) -1323.2, MAF(5) -1300.5.",
    ),
    "names": Experiment(
        "Character-level models of US census first names: exact NLL and nats per character",
        [
            ("charrnn", RunSpec(model="charrnn", preset="names", data="names",
                                train=TrainConfig(epochs=100, patience=20, lr=2e-3))),
            ("transformer", RunSpec(model="transformer", preset="names", data="names",
                                    train=TrainConfig(epochs=100, patience=20, lr=1e-3))),
        ],
        "Data: the `names` package's census first names, lower-cased and deduplicated (5,163), fixed split "
        "4,131 / 516 / 516, END-padded to 12 tokens. Nats per character count each name's END. Training "
        "stops after 20 epochs without validation improvement; the best-validation weights are evaluated. "
        "Samples (temperature 1.0 and 0.7) are in each run's samples.txt.",
    ),
    "anomaly": Experiment(
        "Likelihood-based anomaly scoring: MNIST test vs OOD sets, ROC AUC of exact log p(x)",
        [
            ("fvsbn", _ar("fvsbn", None, 50)),
            ("made-1mask", _ar("made", "mnist-1mask", 15)),
            ("made-8masks", _ar("made", "mnist-8masks", 10)),
            ("pixelcnn", _ar("pixelcnn", "cpu", 2)),
        ],
        f"Scores: exact log p(x) of the first {ANOMALY_N:,} binarized MNIST test images and of "
        f"{ANOMALY_N:,} images of each OOD set (experiments/anomaly.py: Bernoulli noise at MNIST's "
        "ink density, inverted and 90-degree-rotated test images, scikit-learn digits upsampled to "
        "28x28). AUC = P(score of an MNIST image > score of an OOD image). The runs are those of "
        "`dgm reproduce mnist-ar` (trained there if missing).",
        shares="mnist-ar",
        report=anomaly_report,
    ),
}


TINY = dict(epochs=1, max_steps=3, eval_k=10, eval_limit=20, progress=False)


def reproduce(name: str, out: Optional[Path] = None, device: str = "auto", tiny: bool = False) -> str:
    """Train and evaluate every run of experiment ``name`` into ``out`` and return the
    results table; ``tiny`` shrinks every run to a few steps (a pipeline check)."""
    if name not in EXPERIMENTS:
        raise DGMError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    out = Path(out) if out is not None else Path("runs") / (name + ("-tiny" if tiny else ""))
    home = out if exp.shares is None else out.parent / (exp.shares + ("-tiny" if tiny else ""))
    dirs = []
    for run_name, spec in exp.runs:
        spec = replace(spec, train=replace(spec.train, device=device, **(TINY if tiny else {})))
        print(f"[{name}] {run_name}: training ({spec.objective}, K={spec.k}, {spec.train.epochs} epochs)", flush=True)
        train_run(spec, home / run_name)
        dirs.append(home / run_name)
    table = f"# {name}\n\n{exp.description}\n\n" + compare(dirs) + "\n" + exp.notes + "\n"
    if exp.report is not None:
        table += "\n" + exp.report(dirs, tiny)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    return table
