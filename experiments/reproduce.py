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
* ``--protocol paper`` (``mnist-iwae``, ``mnist-vae2``): Burda et al.'s training protocol
  exactly, for a GPU: every column of their Table 1 (VAE with K = 1, 5, 50 samples, IWAE with
  K = 5, 50), batch 20, Adam (beta1 0.9, beta2 0.999, eps 1e-4), learning rate 1e-3 x 10^(-i/7)
  for 3^i epochs, i = 0..7 (3,280 epochs, ``--lr-schedule burda``), test NLL by IS with
  K = 5,000 on all 10,000 test images. Not reproduced: their weight initialization (Glorot and
  Bengio's heuristic; ours is PyTorch's default). The default protocol (``cpu``) is the CPU
  budget above.
* ``ar-vae``: posterior collapse of a VAE with an autoregressive decoder (conditional Gated
  PixelCNN on the embedded MNIST subset, LSTM on names) under the plain ELBO, KL annealing and
  free bits: test KL, active units, ELBO and IS NLL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from experiments.config import RunConfig, read_config
from experiments.runs import compare, train_run
from inference.config import TrainConfig
from inference.lr_schedules import burda_epochs, fixed_epochs
from models.base import DGMError
from models.registry import Registry


@dataclass
class Experiment:
    """``runs`` are trained into ``OUT/<run name>``, or into ``OUT/../<shares>/<run name>``
    when the experiment reuses another experiment's runs; ``report`` (if any) turns the
    run directories into more Markdown after the standard table."""

    description: str
    runs: List[Tuple[str, RunConfig]]
    notes: str
    shares: Optional[str] = None
    report: Optional[Callable[[List[Path], bool], str]] = None
    paper: Optional[List[Tuple[str, RunConfig]]] = None
    """The runs of the paper's own training protocol (``--protocol paper``), where it differs."""


ANOMALY_N = 2_000  # MNIST test images scored, and the size of each OOD set


def anomaly_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """ROC AUC of MNIST test images against each OOD set, scored by each run's log p(x)."""
    import torch

    from experiments.anomaly import OOD_SETS, ood_set, roc_auc
    from experiments.runs import load_data, score_run

    n = 50 if tiny else ANOMALY_N
    lines = [
        "| run | mean log p(x) (MNIST test) | " + " | ".join(f"AUC {s}" for s in OOD_SETS) + " |",
        "|---|---|" + "---|" * len(OOD_SETS),
    ]
    for d in run_dirs:
        config = read_config(Path(d) / "config.json")
        test = load_data(config.data, config.train.seed).test
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


def eval_quality_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """IS against AIS on each run (``experiments.eval_quality``)."""
    from experiments.eval_quality import report

    return report(run_dirs, tiny)


VQ_PRIORS = (("pixelcnn", "cpu", 10), ("gated_pixelcnn", "cpu", 10))  # stage 2: (model, preset, epochs)


def vqvae_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """Stage 2 of each VQ-VAE run: fit each learned prior over its codes (``dgm fit-prior``),
    then tabulate reconstruction, codebook perplexity and the NLL bounds."""
    from experiments.code_prior import fit_prior

    lines = [
        "| run | prior | prior epochs | reconstruction (nats) | code perplexity | NLL bound, uniform prior "
        "| code NLL under the prior | NLL bound, learned prior |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        for prior, preset, epochs in VQ_PRIORS:
            train = TrainConfig(epochs=epochs, progress=False, **({"max_steps": 3} if tiny else {}))
            s = fit_prior(d, prior=prior, preset=preset, train=train)
            t = s["test"]
            lines.append(
                f"| {Path(d).name} | {prior}[{preset}] | {s['epochs']} | {t['recon']['mean']:.2f} "
                f"| {s['test_code_perplexity']:.1f} | {t['uniform']['mean']:.2f} ± {t['uniform']['stderr']:.2f} "
                f"| {t['prior_nll']['mean']:.2f} | {t['bound']['mean']:.2f} ± {t['bound']['stderr']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _vae(data: str, objective: str, k: int, epochs: int, eval_k: int, **train) -> RunConfig:
    return RunConfig.from_flat(
        model="vae",
        preset="iwae-1layer",
        data=data,
        binarization="dynamic",
        objective=objective,
        k=k,
        epochs=epochs,
        batch_size=100,
        lr=1e-3,
        eval_k=eval_k,
        **train,
    )


def _ar(model: str, preset: Optional[str], epochs: int, **train) -> RunConfig:
    """A fully observed model on dynamically binarized MNIST; test NLL is exact."""
    return RunConfig.from_flat(
        model=model,
        preset=preset,
        data="mnist",
        binarization="dynamic",
        epochs=epochs,
        batch_size=100,
        lr=1e-3,
        **train,
    )


def ar_vae_report(run_dirs: List[Path], tiny: bool = False) -> str:
    """Test KL(q(z|x) || p(z)) of each run (closed form, on the evaluated test points), and
    how many latent dimensions carry more than 0.01 nats of it on average."""
    from experiments.runs import load_run

    lines = ["| run | test KL (nats) | dims with KL > 0.01 | largest KL of one dim |", "|---|---|---|---|"]
    for d in run_dirs:
        run = load_run(d)
        test = run.data.test[: run.config.eval.limit].to(run.device)
        kl = run.model.kl_per_dimension(test).mean(0)
        lines.append(f"| {Path(d).name} | {float(kl.sum()):.2f} | {int((kl > 0.01).sum())} | {float(kl.max()):.3f} |")
    return "\n".join(lines) + "\n"


def _ar_vae(data: str, epochs: int, eval_k: int, eval_limit: Optional[int], **schedule) -> RunConfig:
    """The autoregressive-decoder VAE (its preset named like the data), trained with the ELBO
    and the KL ``schedule`` (``kl_warmup``, ``free_bits``, ...) given."""
    return RunConfig.from_flat(
        model="ar_vae",
        preset="mnist" if data.startswith("mnist") else data,
        data=data,
        objective="elbo",
        **schedule,
        epochs=epochs,
        batch_size=100,
        lr=1e-3,
        eval_k=eval_k,
        eval_limit=eval_limit,
    )


AR_VAE_MNIST = dict(data="mnist-embedded", epochs=15, eval_k=100, eval_limit=500)
AR_VAE_NAMES = dict(data="names", epochs=40, eval_k=1000, eval_limit=None)


def _latent(
    model: str,
    preset: str,
    objective: str = "elbo",
    k: int = 1,
    *,
    epochs: int,
    eval_k: int = 1000,
    eval_limit: Optional[int] = 1000,
    lr: float = 1e-3,
    **spec,
) -> RunConfig:
    """A latent-variable model on dynamically binarized MNIST; test NLL by importance sampling
    with its (trained) guide as proposal, on the first ``eval_limit`` test images."""
    return RunConfig.from_flat(
        model=model,
        preset=preset,
        data="mnist",
        binarization="dynamic",
        objective=objective,
        k=k,
        epochs=epochs,
        batch_size=100,
        lr=lr,
        eval_k=eval_k,
        eval_limit=eval_limit,
        **spec,
    )


GAUSSIAN_DECODERS = {  # VAE options for real data: a fixed, a shared learned and a per-pixel learned sigma
    "fixed-0.1": {"gaussian_scale": 0.1, "learn_scale": False},
    "shared": {"decoder_scale": "shared"},
    "per-pixel": {"decoder_scale": "per-pixel"},
}


def _paper(model: str, preset: str) -> List[Tuple[str, RunConfig]]:
    """Burda et al. (2016)'s protocol, every column of their Table 1: the VAE (ELBO with K
    samples) and IWAE at K = 1 (the same objective), 5 and 50; batch 20; Adam with eps 1e-4;
    the ``burda`` schedule (3,280 epochs); test NLL by IS, K = 5,000, all test images."""
    runs = [(f"{model}-elbo" + (f"{k}" if k > 1 else ""), "elbo", k) for k in (1, 5, 50)]
    runs += [(f"{model}-iwae{k}", "iwae", k) for k in (5, 50)]
    return [
        (
            name,
            RunConfig.from_flat(
                model=model,
                preset=preset,
                data="mnist",
                binarization="dynamic",
                objective=objective,
                k=k,
                epochs=burda_epochs(8),
                batch_size=20,
                lr=1e-3,
                adam_eps=1e-4,
                lr_schedule="burda",
                lr_burda_stages=8,
                eval_k=5000,
                eval_limit=None,
            ),
        )
        for name, objective, k in runs
    ]


MNIST_IWAE_RUNS = [
    ("vae-elbo", _vae("mnist", "elbo", 1, 20, 5000)),
    ("vae-iwae5", _vae("mnist", "iwae", 5, 20, 5000)),
    ("vae-iwae50", _vae("mnist", "iwae", 50, 10, 5000)),
]

_EXPERIMENTS = {
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
        MNIST_IWAE_RUNS,
        "Data: MNIST, dynamic binarization (train resampled every epoch; test binarized once, "
        "seed 1), 59,600/400 split. Test NLL: importance sampling, K = 5,000, all 10,000 test "
        "images. Burda et al. (2016) report 86.76 / 85.54 / 84.78 after 3,280 epochs.",
        paper=_paper("vae", "iwae-1layer"),
    ),
    "eval-quality": Experiment(
        "How far to trust log p(x) (Wu et al. 2017, Table 1 analogue): IS at K = 10..100,000 against AIS at "
        "T = 100..10,000 on the ELBO- and IWAE-trained VAEs of mnist-iwae",
        MNIST_IWAE_RUNS[:2],  # the ELBO- and IWAE-trained VAEs
        "The runs are mnist-iwae's (trained there if missing). Estimates on stated subsets of the test images; "
        "each is a stochastic lower bound of log p(x), so on the same images the larger is the better. AIS: prior "
        "start, sigmoid schedule, 16 chains, 10 leapfrog steps, step size adapted toward 0.65 acceptance.",
        shares="mnist-iwae",
        report=eval_quality_report,
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
            ("rnade", RunConfig.from_flat(model="rnade", preset="mnist", data="mnist-logit", epochs=1)),
            ("maf", RunConfig.from_flat(model="maf", preset="mnist-cpu", data="mnist-logit", epochs=2)),
            ("realnvp", RunConfig.from_flat(model="realnvp", preset="mnist-cpu", data="mnist-logit", epochs=3)),
        ],
        "Data: MNIST pixels dequantized with uniform noise (fixed seed), scaled to [lambda, 1 - lambda] "
        "with lambda = 1e-6 and mapped through the logit (Papamakarios et al. 2017); 59,600/400 split. "
        "Test log-likelihood in nats in logit space = -(test NLL); bits/dim in pixel space (8-bit pixels, "
        "dequantized). Flows use batch-norm statistics of the whole training set after training (MAF paper). "
        "The flows are the `mnist-cpu` presets (5 layers, one hidden layer of 512) trained 2-3 epochs. "
        "MAF paper: MADE MoG -1038.5, Real NVP(5) -1323.2, MAF(5) -1300.5.",
    ),
    "names": Experiment(
        "Character-level models of US census first names: exact NLL and nats per character",
        [
            (
                "charrnn",
                RunConfig.from_flat(model="charrnn", preset="names", data="names", epochs=100, patience=20, lr=2e-3),
            ),
            (
                "transformer",
                RunConfig.from_flat(
                    model="transformer",
                    preset="names",
                    data="names",
                    epochs=100,
                    patience=20,
                    lr=1e-3,
                ),
            ),
        ],
        "Data: the `names` package's census first names, lower-cased and deduplicated (5,163), fixed split "
        "4,131 / 516 / 516, END-padded to 12 tokens. Nats per character count each name's END. Training "
        "stops after 20 epochs without validation improvement; the best-validation weights are evaluated. "
        "Samples (temperature 1.0 and 0.7) are in each run's samples.txt.",
    ),
    "flows-toy": Experiment(
        "Normalizing flows as density models on 2-D toy densities: exact test log-likelihood and density plots",
        [
            (f"{model}-{data}", RunConfig.from_flat(model=model, preset="toy", data=data, epochs=10, lr=2e-3))
            for data in ("moons", "rings", "checkerboard")
            for model in ("nice", "realnvp", "maf")
        ],
        "Data: 20,000 / 2,000 / 2,000 points sampled once from each density (fixed seed). Test NLL is exact "
        "(change of variables), in nats per point; best-validation weights. Each run directory holds "
        "density.png (data histogram, model density on a grid with its mass in view, model samples).",
    ),
    "gaussian-vae": Experiment(
        "Gaussian-decoder VAEs on dequantized digits and MNIST: fixed vs learned decoder variance",
        [
            (
                f"digits-{name}",
                RunConfig.from_flat(
                    model="vae",
                    preset="small",
                    options=options,
                    data="digits-dequantized",
                    epochs=300,
                    lr=1e-3,
                    eval_k=1000,
                ),
            )
            for name, options in GAUSSIAN_DECODERS.items()
        ]
        + [
            (
                f"mnist-{name}",
                RunConfig.from_flat(
                    model="vae",
                    preset="iwae-1layer",
                    options=options,
                    data="mnist-dequantized",
                    epochs=5,
                    lr=1e-3,
                    eval_k=1000,
                    eval_limit=1000,
                ),
            )
            for name, options in GAUSSIAN_DECODERS.items()
            if name != "fixed-0.1"
        ],
        "Data: grey levels made continuous on [0, 1], x = (level + u) / L with fixed uniform noise (L = 17 "
        "for digits, 1,257/180/360; L = 256 for MNIST, 59,600/400/10,000). Decoder: N(x | mu(z), sigma^2) "
        "with sigma fixed at 0.1, one learned scalar, or learned per pixel. Test NLL in nats on the "
        "continuous data (IS, K = 1,000; MNIST on the first 1,000 test images); bits/dim = (NLL + D log L) "
        "/ (D log 2), the code length of the discrete levels the density bounds.",
    ),
    "mnist-vae2": Experiment(
        "Two-stochastic-layer VAE (784-200-200-100-100-50, Burda et al. 2016) on dynamically binarized MNIST: "
        "ELBO and IWAE K=5 (10 epochs), IWAE K=50 (2 epochs); IS K=5000",
        [
            ("vae2-elbo", _latent("vae2", "iwae-2layer", epochs=10, eval_k=5000)),
            ("vae2-iwae5", _latent("vae2", "iwae-2layer", "iwae", 5, epochs=10, eval_k=5000)),
            ("vae2-iwae50", _latent("vae2", "iwae-2layer", "iwae", 50, epochs=2, eval_k=5000)),
        ],
        "Data: MNIST, dynamic binarization, 59,600/400 split, best-validation weights. Test NLL: importance "
        "sampling with the encoder as proposal, K = 5,000, on the first 1,000 test images (a CPU budget); "
        "active units: Cov_x(E_q[z]) > 0.01 per unit, h1 then h2. Burda et al. (2016, Table 1) report "
        "85.33 / 83.89 / 82.90 (VAE / IWAE K=5 / IWAE K=50) after 3,280 epochs.",
        paper=_paper("vae2", "iwae-2layer"),
    ),
    "sbn": Experiment(
        "Sigmoid belief nets on dynamically binarized MNIST, score-function ELBO gradients with two baselines",
        [
            ("sbn200-average", _latent("sbn", "mnist-1layer", "elbo-sf", epochs=40, baseline="average")),
            ("sbn200-neural", _latent("sbn", "mnist-1layer", "elbo-sf", epochs=40, baseline="neural")),
            ("sbn200x2-neural", _latent("sbn", "mnist-2layer", "elbo-sf", epochs=40, baseline="neural")),
        ],
        "Data: MNIST, dynamic binarization, 59,600/400 split, best-validation weights. Guide: a factorized "
        "Bernoulli recognition network per layer; gradients: REINFORCE with a decaying-average baseline or "
        "an NVIL-style input-dependent (neural) baseline. Test NLL: importance sampling K = 1,000 on the "
        "first 1,000 test images. MuProp (Gu et al. 2016) report test NELBO 113.5 (200, NVIL-type) and "
        "99.7 (200-200) after far longer training.",
    ),
    "m2": Experiment(
        "M2 semi-supervised VAE on MNIST: classifier accuracy with 100 / 600 / 3,000 labels",
        [(f"m2-{n}", _latent("m2", "mnist", "elbo-enum", epochs=10, eval_k=100, labelled=n)) for n in (100, 600, 3000)],
        "Data: MNIST, dynamic binarization, 59,600/400 split; `--labelled N` keeps N class-balanced "
        "training labels (seed 0) and hides the rest; the unlabelled y is summed out exactly "
        "(elbo-enum). Test accuracy: argmax q(y | x) on all 10,000 test images; the NLL column is "
        "-log p(x, y) with the test label (IS, K = 100, first 1,000 images). Kingma et al. (2014) report "
        "test error 11.97% / 4.94% / 3.92% (accuracy 88.0% / 95.1% / 96.1%) after much longer training.",
    ),
    "mixtures": Experiment(
        "Mixture of 500 Bernoullis on dynamically binarized MNIST: exact log p(x) with EM and with SVI",
        [
            ("bernoulli-mixture-500-em", _latent("bernoulli_mixture", "mnist-exact", "em", epochs=30, eval_limit=None)),
            (
                "bernoulli-mixture-500-svi",
                _latent("bernoulli_mixture", "mnist-exact", "elbo-enum", epochs=2, lr=1e-2, eval_limit=None),
            ),
        ],
        "Data: MNIST, dynamic binarization, 59,600/400 split. EM: 30 closed-form MAP-EM steps (pseudo-counts "
        "1), each on a fresh binarization of the whole training set. SVI: Adam (lr 0.01) on the exact "
        "marginal likelihood (the component is enumerated, so the bound is log p(x) itself), 2 epochs of "
        "minibatches of 100 (enumerating 500 components costs about 0.5-1.5 s per step here). Test NLL exact "
        "on all 10,000 test images. The course notes quote 137.64 nats for this model.",
    ),
    "iaf-guide": Experiment(
        "Flow guides: the one-layer VAE with its diagonal Gaussian encoder vs the same encoder pushed "
        "through IAF (2 steps), ELBO, 10 epochs",
        [
            ("vae-diagonal", _latent("vae", "iwae-1layer", epochs=10)),
            ("vae-iaf2", _latent("vae", "iwae-1layer", epochs=10, guide="iaf", flow_depth=2)),
        ],
        "Data: MNIST, dynamic binarization, 59,600/400 split, best-validation weights. Test NLL: "
        "importance sampling with each run's own guide as proposal, K = 1,000, first 1,000 test images. "
        "Kingma et al. (2016) report about 2 nats of gain with a convolutional ResNet VAE.",
    ),
    "vqvae": Experiment(
        "VQ-VAE on dynamically binarized MNIST (7x7 grid of 64 codes, EMA codebook), then learned PixelCNN "
        "priors over its codes",
        [("vqvae-cpu", RunConfig.from_flat(model="vqvae", preset="cpu", data="mnist", epochs=7, eval_k=1))],
        "Data: MNIST, dynamic binarization, 59,600/400 split. The guide is deterministic (nearest code), so the "
        "ELBO with the uniform prior over code grids is log p(x | z_q) - 49 log 64 exactly, and IS with K = 1 "
        "equals it. Stage 2 (`dgm fit-prior`) fits each prior to the codes of one fixed binarization of the "
        "training set; the learned-prior bound is -log p(x | z_q(x)) - log p_prior(z_q(x)) per test image "
        "(all 10,000). Samples from the prior, decoded: RUN/prior-*/samples.png.",
        report=vqvae_report,
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
    "ar-vae": Experiment(
        "VAE with an autoregressive decoder: posterior collapse under the ELBO, and KL annealing "
        "and free bits against it (conditional Gated PixelCNN on MNIST, LSTM on names)",
        [
            ("mnist-elbo", _ar_vae(**AR_VAE_MNIST)),
            ("mnist-anneal", _ar_vae(**AR_VAE_MNIST, kl_warmup=400)),
            ("mnist-freebits", _ar_vae(**AR_VAE_MNIST, free_bits=0.25, free_bits_per="dimension")),
            ("names-elbo", _ar_vae(**AR_VAE_NAMES)),
            ("names-anneal", _ar_vae(**AR_VAE_NAMES, kl_warmup=1000)),
            ("names-freebits", _ar_vae(**AR_VAE_NAMES, free_bits=0.25, free_bits_per="dimension")),
        ],
        "Model: `ar_vae` (models/latent/ar_vae.py), presets `mnist` (z of 32 dims, the `cpu` Gated "
        "PixelCNN with a z-dependent bias in every layer, MLP encoder 784-200-200) and `names` (z of 16 "
        "dims into the initial state and every input of a 256-unit LSTM, MLP encoder on one-hot "
        "characters). Trained with the ELBO (batch 100, Adam 1e-3): plain; with KL annealing (beta "
        "linear from 0 to 1 over the first 400 / 1,000 steps); with free bits (lambda = 0.25 nats per "
        "latent dimension, on the minibatch-mean KL). MNIST: the embedded subset (statically "
        "binarized), 15 epochs, evaluated on the first 500 test images; names: 40 epochs, all 516 test "
        "names. The best-validation weights are evaluated. Test NLL: importance sampling with the "
        "encoder as proposal (K = 100 for MNIST, 1,000 for names); ELBO: the mean over those K "
        "samples. Active units: Cov_x(E_q[z_j | x]) > 0.01 (Burda et al. 2016). A collapsed run has "
        "KL ~ 0 and no active units.",
        report=ar_vae_report,
    ),
}


EXPERIMENTS = Registry("experiment")
"""Experiment name -> :class:`Experiment`."""
for _name, _experiment in _EXPERIMENTS.items():
    EXPERIMENTS.add(_name, _experiment, _experiment.description)


# --- inference strategies (issue 13; reports in experiments.strategies) -------------------------
def _snr_report(run_dirs: List[Path], tiny: bool = False) -> str:
    from experiments.strategies import snr_report

    return snr_report(run_dirs, tiny)


def _gaps_report(run_dirs: List[Path], tiny: bool = False) -> str:
    from experiments.strategies import gaps_report

    return gaps_report(run_dirs, tiny)


def _strategies_report(run_dirs: List[Path], tiny: bool = False) -> str:
    from experiments.strategies import strategies_report

    return strategies_report(run_dirs, tiny)


def _discrete_report(run_dirs: List[Path], tiny: bool = False) -> str:
    from experiments.strategies import discrete_report

    return discrete_report(run_dirs, tiny)


STRATEGY_STEPS = 2_000  # the step budget of every strategies run (3.4 epochs of 596 minibatches; a CPU budget)
STRATEGIES = [  # (run name, objective, K, other settings)
    ("elbo", "elbo", 1, {}),
    ("elbo-sf-nvil", "elbo-sf", 1, {"baseline": "neural"}),
    ("iwae5", "iwae", 5, {}),
    ("renyi0.5-k5", "renyi", 5, {"alpha": 0.5}),
    ("vimco5", "vimco", 5, {}),
    ("dreg5", "dreg", 5, {}),
    ("stl1", "stl", 1, {}),
    ("stl5", "stl", 5, {}),
    ("rws5", "rws", 5, {}),
    ("elbo-local", "elbo", 1, {"guide": "local"}),
    ("elbo-iaf2", "elbo", 1, {"guide": "iaf", "flow_depth": 2}),
    ("elbo-semi-amortized", "elbo", 1, {"guide": "semi-amortized"}),
]
DISCRETE_EPOCHS = 20

_INFERENCE = {
    "gradient-snr": Experiment(
        "Gradient signal-to-noise ratio against K (Rainforth et al. 2018): encoder and decoder SNR of iwae, "
        "dreg and stl at the trained parameters of the ELBO-trained VAE of mnist-iwae",
        MNIST_IWAE_RUNS[:1],
        "The run is mnist-iwae's vae-elbo (trained there if missing). At its trained parameters, for each "
        "objective and K = 1, 3, 10, 30, 100: 100 independent gradient estimates of the loss per datapoint on "
        "the first 100 training images (one binarization, seed 0); SNR = |mean| / std per parameter, averaged "
        "over the encoder's (guide's) and the decoder's parameters (`dgm gradvar`). Rainforth et al.: IWAE's "
        "encoder SNR falls as O(1/sqrt(K)), its decoder SNR rises as O(sqrt(K)); DReG (Tucker et al. 2019) and "
        "STL (Roeder et al. 2017) keep the encoder's from falling.",
        shares="mnist-iwae",
        report=_snr_report,
    ),
    "inference-gaps": Experiment(
        "Approximation and amortization gaps (Cremer et al. 2018) of the one-layer VAE with its diagonal "
        "Gaussian encoder and with an IAF guide (the runs of iaf-guide)",
        _EXPERIMENTS["iaf-guide"].runs,
        "The runs are iaf-guide's (trained there if missing). On the first 100 test images (`dgm gaps`): "
        "log p(x) by AIS (prior start, T = 1,000, 16 chains); q* the best mean-field Gaussian per image (the "
        "local guide started at the encoder's output, 500 full-batch Adam steps (10 samples each) from lr 0.05 "
        "cosine-decayed to 0, "
        "the decoder frozen); ELBOs with 1,000 samples. Approximation gap = log p(x) - ELBO(q*), amortization gap = "
        "ELBO(q*) - ELBO(encoder). For the IAF run q* is still Gaussian, a smaller family than its guide's: "
        "a negative amortization gap there is what the flow gains over the Gaussian family.",
        shares="iaf-guide",
        report=_gaps_report,
    ),
    "strategies": Experiment(
        f"Every objective and guide on the one-layer VAE on MNIST at one step budget ({STRATEGY_STEPS:,} steps)",
        [
            (name, _latent("vae", "iwae-1layer", objective, k, epochs=4, max_steps=STRATEGY_STEPS, **extra))
            for name, objective, k, extra in STRATEGIES
        ],
        "Data: MNIST, dynamic binarization, 59,600/400 split, best-validation weights; batch 100, Adam 1e-3, "
        f"{STRATEGY_STEPS:,} steps each. Test log p(x): importance sampling with each run's guide (refitted for "
        "the local guide; refined for the semi-amortized one), K = 1,000, first 1,000 test images; ELBO: the "
        "mean log-weight of those samples; active units: Cov_x(E_q[z_j | x]) > 0.01. Wall time per step: the "
        "run's training seconds over its steps, and relative to iwae (amortized) at the same K.",
        report=_strategies_report,
    ),
    "discrete-latents": Experiment(
        "Sigmoid belief nets (200 and 200-200 latent units) on binarized MNIST trained with NVIL, VIMCO and RWS "
        f"at one budget ({DISCRETE_EPOCHS} epochs), next to MuProp's Table 3",
        [
            (
                f"{arch}-{tag}",
                _latent("sbn", preset, objective, k, epochs=DISCRETE_EPOCHS, **extra),
            )
            for arch, preset in (("sbn200", "mnist-1layer"), ("sbn200x2", "mnist-2layer"))
            for tag, objective, k, extra in (
                ("nvil", "elbo-sf", 1, {"baseline": "neural"}),
                ("vimco5", "vimco", 5, {}),
                ("rws5", "rws", 5, {}),
            )
        ],
        "Data: MNIST, dynamic binarization, 59,600/400 split, best-validation weights; batch 100, Adam 1e-3. "
        "NVIL = elbo-sf with the neural (input-dependent) baseline plus the decaying average (Mnih and Gregor "
        "2014); VIMCO and RWS with K = 5. Test NELBO: minus the mean log-weight of the IS samples; test NLL: "
        "importance sampling K = 1,000, first 1,000 test images. MuProp (Gu et al. 2016, Table 3) report test "
        f"NELBO 113.5 (200) and 99.7 (200-200) for NVIL after far longer training than these {DISCRETE_EPOCHS} "
        "epochs (the budget gap: their numbers are from runs trained to convergence).",
        report=_discrete_report,
    ),
}
for _name, _experiment in _INFERENCE.items():
    EXPERIMENTS.add(_name, _experiment, _experiment.description)

TINY = dict(train=dict(epochs=1, max_steps=3, progress=False), eval=dict(k=10, limit=20))
PROTOCOLS = ("cpu", "paper")
"""``cpu``: each experiment's CPU budget; ``paper``: the paper's own protocol (``Experiment.paper``)."""


def _tiny(train: TrainConfig) -> dict:
    """``TINY``'s training settings for ``train``: a schedule that fixes the run's length
    keeps its epochs (``--max-steps`` ends the run anyway)."""
    return {**TINY["train"], "epochs": fixed_epochs(train) or TINY["train"]["epochs"]}


def reproduce(
    name: str,
    out: Optional[Path] = None,
    device: str = "auto",
    tiny: bool = False,
    protocol: str = "cpu",
    ais_check: Optional[int] = None,
    ais_steps: Optional[int] = None,
) -> str:
    """Train and evaluate every run of experiment ``name`` into ``out`` and return the
    results table; ``tiny`` shrinks every run to a few steps (a pipeline check);
    ``protocol`` ``paper`` trains the paper's protocol where the experiment has one;
    ``ais_check`` N appends IS against AIS (``ais_steps`` T) on each run's first N test
    images (``experiments.ais_check``)."""
    from experiments.ais_check import ais_check_report, ais_settings

    exp = EXPERIMENTS[name]
    if ais_check:
        ais_settings(ais_check, ais_steps)  # a bad flag is refused before any training
    elif ais_steps is not None:
        raise DGMError("--ais-steps sets the AIS of --ais-check N; give --ais-check too")
    if protocol not in PROTOCOLS:
        raise DGMError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if protocol == "paper" and exp.paper is None:
        with_paper = [n for n in EXPERIMENTS.names() if EXPERIMENTS[n].paper is not None]
        raise DGMError(f"{name} has no paper protocol; experiments with one: {', '.join(with_paper)}")
    runs = exp.paper if protocol == "paper" else exp.runs
    out, home = _locations(name, out, tiny, protocol)
    dirs = []
    for run_name, config in runs:
        small = {"train": _tiny(config.train), "eval": TINY["eval"]} if tiny else {"train": {}, "eval": {}}
        config = replace(
            config,
            train=replace(config.train, device=device, **small["train"]),
            eval=replace(config.eval, **small["eval"]),
        )
        print(
            f"[{name}] {run_name}: training ({config.objective.describe()}, {config.train.epochs} epochs)", flush=True
        )
        train_run(config, home / run_name)
        dirs.append(home / run_name)
    table = f"# {name}\n\n{exp.description}\n\n" + compare(dirs) + "\n" + exp.notes + "\n"
    if exp.report is not None:
        table += "\n" + exp.report(dirs, tiny)
    if ais_check:
        table += "\n" + ais_check_report(dirs, ais_check, ais_steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    return table


def _locations(name: str, out: Optional[Path], tiny: bool, protocol: str) -> Tuple[Path, Path]:
    """``(folder of results.md, folder of the run directories)`` of an experiment."""
    exp = EXPERIMENTS[name]
    tag = ("-paper" if protocol == "paper" else "") + ("-tiny" if tiny else "")
    out = Path(out) if out is not None else Path("runs") / (name + tag)
    return out, (out if exp.shares is None else out.parent / (exp.shares + tag))


def written(name: str, out: Optional[Path] = None, tiny: bool = False, protocol: str = "cpu") -> List[str]:
    """What ``reproduce`` wrote: ``results.md`` and each run's directory with its files."""
    from experiments.runs import run_outputs

    out, home = _locations(name, out, tiny, protocol)
    exp = EXPERIMENTS[name]
    lines = [str(out / "results.md")]
    for run_name, _ in exp.paper if protocol == "paper" else exp.runs:
        files = ", ".join(p.name for p in run_outputs(home / run_name))
        lines.append(f"{home / run_name}/ ({files})")
    return lines
