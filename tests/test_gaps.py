"""Approximation and amortization gaps (``inference.gaps``) on PPCA, where everything is a
closed form: log p(x) is exact; with W's columns orthogonal the posterior p(z | x) is a
diagonal Gaussian, inside the local guide's family, so the approximation gap of q* is 0; and
for a Gaussian encoder q, ELBO(q) = log p(x) - KL(q || p(z | x)), so the amortization gap is
that KL."""

from __future__ import annotations

import math

import torch
from torch.distributions import MultivariateNormal, kl_divergence

from inference.config import EvalConfig, TrainConfig
from inference.gaps import inference_gaps
from inference.guides import AmortizedGuide
from inference.logweights import compute_log_weights
from models.base import DataSpec
from models.latent.ppca import PPCA, PPCAConfig

N, D, Q = 30, 4, 2


def test_gaps_of_ppca_against_closed_forms(float64, one_thread):
    torch.manual_seed(0)
    model = PPCA(DataSpec((D,), "real"), PPCAConfig(latent_dim=Q)).double()
    W = torch.zeros(D, Q, dtype=torch.float64)
    W[0, 0], W[1, 1], W[2, 0] = 1.5, 1.0, 0.5  # orthogonal columns: W^T W diagonal, so is the posterior
    model.set_params(W, torch.tensor([0.5, -1.0, 0.0, 1.0]), 0.25)
    x = model.sample(N)
    A, b, L = model.posterior_affine()
    assert torch.allclose(L, torch.diag(torch.diagonal(L)))  # a diagonal posterior covariance
    model.encoder.set_affine(A + 0.1 * torch.randn_like(A), b - 0.2, 1.3 * L)  # a suboptimal encoder
    guide = AmortizedGuide(model=model)
    gaps = inference_gaps(
        model,
        guide,
        x,
        log_px=EvalConfig(k=10),
        elbo_samples=2000,
        refit_epochs=300,
        refit_lr=0.05,
        train=TrainConfig(device="cpu"),
    )
    with torch.no_grad():
        log_px = model.log_prob(x)
        loc, scale_tril = model.encoder(x)
        kl = kl_divergence(MultivariateNormal(loc, scale_tril=scale_tril), model.posterior(x))
    assert gaps.log_px_method == "exact"
    torch.testing.assert_close(gaps.log_px, log_px, rtol=0, atol=1e-10)
    # ELBO(encoder) = log p(x) - KL(q || posterior), up to the Monte Carlo error of 2,000 samples
    with torch.no_grad():
        lw = compute_log_weights(model.model, guide, (x,), num_particles=2000).log_w
    stderr = lw.std(0) / math.sqrt(2000)
    error = gaps.elbo_encoder - (log_px - kl)
    assert torch.all(error.abs() < 4 * stderr + 1e-6), (error, stderr)
    assert abs(float(error.mean())) < 4 * float(stderr.pow(2).mean().sqrt()) / math.sqrt(N)
    # q* of the (diagonal Gaussian) local family reaches the posterior: no approximation gap
    # (up to Adam's jitter at a constant rate; ELBO <= log p(x) for every datapoint)
    assert gaps.approximation.min() > -0.01 and gaps.approximation.max() < 0.1, gaps.approximation
    assert float(gaps.approximation.mean()) < 0.03
    # so the amortization gap is the encoder's KL from the posterior
    assert torch.all((gaps.amortization - kl).abs() < 4 * stderr + 0.05)
    assert float(kl.mean()) > 0.1  # the encoder is far enough off for that to mean something
    summary = gaps.summary()
    assert summary["n"] == N and math.isclose(
        summary["approximation"] + summary["amortization"], summary["log_px"] - summary["elbo_encoder"], rel_tol=1e-9
    )


def test_dgm_gaps_writes_per_datapoint_gaps_into_the_run(tmp_path, one_thread):
    import json

    from experiments.cli import main
    from tests.helpers import train_tiny_vae

    run = train_tiny_vae(tmp_path / "run")
    args = ["gaps", str(run), "--limit", "3", "--steps", "3", "--chains", "2", "--elbo-samples", "4"]
    assert main(args + ["--refit-epochs", "2", "--no-progress"]) == 0
    out = json.loads((run / "gaps_n3.json").read_text())
    assert out["n"] == 3 and out["log_px_method"] == "ais" and len(out["per_datapoint"]["amortization"]) == 3
    assert math.isclose(out["approximation"] + out["amortization"], out["log_px"] - out["elbo_encoder"], abs_tol=1e-6)


def test_a_local_guide_starts_at_the_moments_of_a_flow_guide(one_thread):
    """q* of the gaps starts at the evaluated guide: for a flow (no closed-form mean) at the
    moments of its samples. An affine flow's are known: mean a + b m, scale |b| s."""
    import pyro
    import pyro.distributions as dist
    import pytest
    from torch.distributions.transforms import AffineTransform

    from inference.guides import INIT_SAMPLES, LocalGuide

    torch.manual_seed(0)
    model = PPCA(DataSpec((D,), "real"), PPCAConfig(latent_dim=Q))
    n = 6
    x = torch.randn(n, D)
    m, s = torch.randn(n, Q), torch.rand(n, Q) + 0.5
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([2.0, -0.5])

    def flow(x, idx=None, size=None):
        q = dist.TransformedDistribution(dist.Normal(m[idx], s[idx]), [AffineTransform(a, b)]).to_event(1)
        with model.data_plate(x, idx, size):
            pyro.sample("z", q)
        return q

    with pytest.raises(NotImplementedError):  # so the moments come from samples
        flow(x, torch.arange(n), n).mean
    guide = LocalGuide(model, x).init_from(flow, x, batch_size=4)  # two batches
    scale = torch.nn.functional.softplus(guide.raw_scale["z"])
    true_loc, true_scale = a + b * m, b.abs() * s
    assert torch.all((guide.loc["z"] - true_loc).abs() < 5 * true_scale / math.sqrt(INIT_SAMPLES))
    assert torch.all((scale / true_scale - 1).abs() < 5 / math.sqrt(2 * INIT_SAMPLES))
