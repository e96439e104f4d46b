"""Stage 2 of a VQ-VAE run: a learned autoregressive prior over its code grids.

A trained VQ-VAE (``dgm train vqvae``) has a uniform prior over the ``h x w`` grids of code
indices; its NLL bound ``-ELBO = -log p(x | z_q(x)) + h w log K`` pays ``log K`` nats per
cell. Stage 2 (van den Oord et al. 2017, Section 4.2) encodes the data into code grids,
fits a categorical PixelCNN (or Gated PixelCNN) with ``K`` levels to them through the same
``Runner`` as every model, and reports, per test image, the bound with the learned prior::

    -log p(x) <= -log p(x | z_q(x)) - log p_prior(k(x))

valid because ``p(x) = sum_k p(x | k) p_prior(k) >= p(x | k(x)) p_prior(k(x))`` for the one
grid ``k(x)`` the encoder picks. The prior's log-likelihood is exact (an autoregressive
model), so the bound needs no sampling. Samples: draw grids from the prior, decode them
(Bernoulli means), save a PNG.

The codes of the training set are those of one fixed binarization of it (seeded; the
VQ-VAE itself saw a fresh binarization every epoch); validation and test data are binary
already. The prior run lives under the VQ-VAE run: ``RUN/prior-<model>[-<preset>]/`` with
``config.json``, ``metrics.jsonl``, checkpoints, ``samples.png`` and ``summary.json``;
running the same command again resumes it, another configuration is refused.

    dgm fit-prior RUN --prior pixelcnn --preset cpu --epochs 20
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from experiments.config import ModelConfig
from experiments.data import Dataset
from experiments.plots import save_samples
from experiments.runs import build_model, load_run
from inference.device import eval_mode
from inference.objectives import ELBO
from inference.runner import Runner, TrainConfig
from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.vqvae import VQVAE
from models.nn.quantize import perplexity

PRIORS = ("pixelcnn", "gated_pixelcnn")


@torch.no_grad()
def encode_all(vqvae: VQVAE, x: Tensor, batch_size: int = 500) -> Tensor:
    """Code grids of ``x`` as float levels ``[N, h * w]`` (raster order)."""
    with eval_mode(vqvae):
        parts = [vqvae.encode(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(parts).flatten(1).float()


def code_dataset(vqvae: VQVAE, data, seed: int = 0, batch_size: int = 500) -> Dataset:
    """The train / val / test code grids of ``data`` under ``vqvae``: categorical data with
    ``K`` levels, event shape ``(h * w,)`` and image shape ``(h, w)`` (see the module
    docstring for the training set's binarization)."""
    device = vqvae.quantizer.codebook.device
    train = data.train_epoch(torch.Generator().manual_seed(seed)).to(device)
    h, w = vqvae.grid_shape
    spec = DataSpec((h * w,), "categorical", num_levels=vqvae.config.num_codes, image_shape=(h, w))
    parts = {
        split: encode_all(vqvae, x.to(device), batch_size).cpu()
        for split, x in (("train", train), ("val", data.val), ("test", data.test))
    }
    return Dataset(
        name=f"codes[{data.name}]",
        spec=spec,
        **parts,
        info={"binarization": f"train: one draw (seed {seed}); val/test: as {data.name}", "source": data.name},
    )


@torch.no_grad()
def nll_bounds(vqvae: VQVAE, prior: GenerativeModel, x: Tensor, codes: Tensor, batch_size: int = 500) -> Dict:
    """Per-image terms ``[N]`` (nats): ``recon = -log p(x | z_q(x))``, ``prior_nll =
    -log p_prior(k(x))``, ``bound = recon + prior_nll`` and ``uniform = recon + h w log K``
    (the VQ-VAE's own bound)."""
    recon, prior_nll = [], []
    with eval_mode(vqvae, prior):
        for i in range(0, x.shape[0], batch_size):
            grids = codes[i : i + batch_size]
            ks = grids.long().reshape((grids.shape[0],) + vqvae.grid_shape)
            recon.append(-vqvae.log_likelihood(x[i : i + batch_size], ks))
            prior_nll.append(-prior.log_prob(grids))
    recon_t, prior_t = torch.cat(recon), torch.cat(prior_nll)
    h, w = vqvae.grid_shape
    return {
        "recon": recon_t,
        "prior_nll": prior_t,
        "bound": recon_t + prior_t,
        "uniform": recon_t + h * w * math.log(vqvae.config.num_codes),
    }


class DecodedPrior(nn.Module):
    """Ancestral sampling through both stages: grids from the prior, images from the decoder
    (Bernoulli means), for ``experiments.plots.save_samples``."""

    def __init__(self, vqvae: VQVAE, prior: GenerativeModel):
        super().__init__()
        self.vqvae, self.prior = vqvae, prior

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        grids = self.prior.sample(n).long().reshape((n,) + self.vqvae.grid_shape)
        return self.vqvae.decode(grids, mean=True)


def _mean_stderr(t: Tensor) -> Dict[str, float]:
    t = t.double()
    return {"mean": float(t.mean()), "stderr": float(t.std() / math.sqrt(t.numel())) if t.numel() > 1 else 0.0}


def fit_prior(
    run_dir: Path,
    prior: str = "pixelcnn",
    preset: Optional[str] = None,
    options: Optional[dict] = None,
    train: Optional[TrainConfig] = None,
    seed: int = 0,
) -> Dict:
    """Fit ``prior`` to the codes of the VQ-VAE run in ``run_dir`` (resuming a previous
    attempt), write ``RUN/prior-.../summary.json`` and ``samples.png``, return the summary."""
    if prior not in PRIORS:
        raise DGMError(f"unknown code prior {prior!r}; choose from {', '.join(PRIORS)}")
    run = load_run(run_dir)
    vqvae, data = run.model, run.data
    if not isinstance(vqvae, VQVAE):
        raise DGMError(
            f"{run_dir} is a {run.config.model.name} run; a code prior needs a vqvae run (dgm train vqvae ...)"
        )
    train = train or TrainConfig()
    prior_spec = ModelConfig(prior, preset, dict(options or {}))
    prior_dir = Path(run_dir) / f"prior-{prior}{'-' + preset if preset else ''}"
    shown = {k: v for k, v in asdict(train).items() if k not in ("progress", "log_every", "checkpoint_seconds")}
    config = {"prior": prior, "preset": preset, "options": prior_spec.options, "code_seed": seed, "train": shown}
    _check_config(prior_dir, config)

    codes = code_dataset(vqvae, data, seed=seed)
    torch.manual_seed(train.seed)
    model = build_model(prior_spec, codes.spec)
    runner = Runner(model, codes, ELBO(), config=train, run_dir=prior_dir)
    progress = runner.fit()
    code_eval = runner.evaluate(estimator="exact")

    x_test, c_test = data.test.to(runner.device), codes.test.to(runner.device)
    vqvae.to(runner.device)
    terms = nll_bounds(vqvae, model, x_test, c_test)
    h, w = vqvae.grid_shape
    summary = {
        "vqvae_run": str(run_dir),
        "prior": prior,
        "preset": preset,
        "codes": codes.describe(),
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "train_seconds": round(progress["train_seconds"], 2),
        "prior_code_nll": code_eval["nll"],
        "test": {name: _mean_stderr(t) for name, t in terms.items()},
        "uniform_prior_nats": h * w * math.log(vqvae.config.num_codes),
        "test_code_perplexity": float(perplexity(c_test.long(), vqvae.config.num_codes)),
        "n_test": int(x_test.shape[0]),
    }
    if data.spec.image_shape is not None:
        save_samples(DecodedPrior(vqvae, model), data.spec, prior_dir / "samples.png", n=64)
        summary["samples"] = str(prior_dir / "samples.png")
    (prior_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_config(prior_dir: Path, config: dict) -> None:
    path = prior_dir / "config.json"
    as_json = json.loads(json.dumps(config, default=str))
    if path.exists() and json.loads(path.read_text()) != as_json:
        raise DGMError(f"{prior_dir} holds a prior fitted with another configuration; delete it to refit")
    prior_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_json, indent=2) + "\n")
