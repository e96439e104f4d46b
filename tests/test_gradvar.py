"""Gradient variance and SNR (``inference.gradvar``) on PPCA, where the ELBO and the variance
of its reparameterized gradient are closed forms: the mean of M estimates is the exact
gradient, the variance of the mu-gradient is diag(W S W^T) / (B sigma^4), the groups are the
encoder's and the decoder's parameters, and the SNR is |mean| / std per parameter."""

from __future__ import annotations

import math

import torch

from inference.gradvar import gradient_estimates, gradient_stats, parameter_groups
from inference.guides import AmortizedGuide
from inference.objectives import ELBO
from models.base import DataSpec
from models.latent.ppca import PPCA, PPCAConfig

B, D, Q = 20, 4, 2


def _ppca():
    torch.manual_seed(0)
    model = PPCA(DataSpec((D,), "real"), PPCAConfig(latent_dim=Q, init_scale=0.5))
    with torch.no_grad():
        model.log_sigma.fill_(math.log(0.7))
        model.mu.copy_(torch.randn(D))
        model.encoder.scale_tril_raw.copy_(torch.tensor([[-0.5, 0.0], [0.3, -1.0]]))
    x = model.sample(B)
    return model, x


def _exact_elbo(model: PPCA, x):
    """Closed-form ELBO per datapoint for q = N(A x + b, L L^T)."""
    m, L = model.encoder(x)
    S = L @ L.T
    W, s2 = model.W, model.sigma2
    resid = x - m @ W.T - model.mu
    loglik = -0.5 * D * torch.log(2 * math.pi * s2) - (resid.pow(2).sum(-1) + torch.trace(W @ S @ W.T)) / (2 * s2)
    kl = 0.5 * (torch.trace(S) + m.pow(2).sum(-1) - Q - torch.logdet(S))
    return loglik - kl


def test_groups_mean_variance_and_snr_against_closed_forms(float64, one_thread):
    model, x = _ppca()
    model = model.double()
    x = x.double()
    guide = AmortizedGuide(model=model)
    groups = parameter_groups(model, guide, x)
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in model.encoder.parameters()}
    assert [id(p) for p in groups["decoder"]] == [id(model.W), id(model.mu), id(model.log_sigma)]
    M = 200
    torch.manual_seed(1)
    est = gradient_estimates(ELBO(1), model, guide, x, groups, M)
    # the mean of the estimates is the exact gradient of the loss per datapoint, -mean_b ELBO_b
    params = groups["encoder"] + groups["decoder"]
    exact = torch.autograd.grad(-_exact_elbo(model, x).mean(), params)
    exact = {
        "encoder": torch.cat([g.reshape(-1) for g in exact[: len(groups["encoder"])]]),
        "decoder": torch.cat([g.reshape(-1) for g in exact[len(groups["encoder"]) :]]),
    }
    for group, g in est.items():
        assert g.shape == (M, exact[group].numel())
        tolerance = 5 * g.std(0) / math.sqrt(M) + 1e-9
        assert torch.all((g.mean(0) - exact[group]).abs() <= tolerance), group
    # closed-form variance of the mu-gradient: (1/B) sum_b W (z_b - m_b) / sigma^2, z_b ~ N(m_b, S)
    _, L = model.encoder(x)
    with torch.no_grad():
        var_mu = torch.diagonal(model.W @ L @ L.T @ model.W.T) / (B * model.sigma2**2)
    start = model.W.numel()
    measured = est["decoder"][:, start : start + D].var(0)
    torch.testing.assert_close(measured, var_mu, rtol=0.35, atol=0)  # sqrt(2 / M) = 10% sampling error
    # the group statistics are the per-parameter SNR |mean| / std, averaged over parameters
    stats = gradient_stats(est)
    for group, g in est.items():
        varies = g.std(0) > 0  # the unused upper triangle of the encoder's scale_tril_raw never varies
        assert varies.sum() < g.shape[1] if group == "encoder" else bool(varies.all())
        snr = g.mean(0).abs()[varies] / g.std(0)[varies]
        assert math.isfinite(stats[group].snr) and stats[group].snr > 0
        assert stats[group].snr == float(snr.mean())
        assert stats[group].variance == float(g.var(0).mean())
        assert stats[group].parameters == g.shape[1] and stats[group].n_estimates == M


def test_dgm_gradvar_writes_the_table_json_and_png_into_the_run(tmp_path, capsys, one_thread):
    import json

    from experiments.cli import main
    from tests.helpers import train_tiny_vae

    run = train_tiny_vae(tmp_path / "run")
    args = ["gradvar", str(run), "--objective", "iwae", "--k", "2", "--n-estimates", "3", "--batch-size", "5"]
    assert main(args) == 0
    out = json.loads((run / "gradvar_iwae_K2.json").read_text())
    assert out["n_estimates"] == 3 and out["batch_size"] == 5 and set(out["groups"]) == {"encoder", "decoder"}
    assert (run / "gradvar_iwae_K2.md").read_text().count("| encoder |") == 1
    assert (run / "gradvar_iwae_K2.png").stat().st_size > 0
    assert main(["gradvar", str(run), "--n-estimates", "1"]) == 2
    assert "--n-estimates must be >= 2" in capsys.readouterr().err
