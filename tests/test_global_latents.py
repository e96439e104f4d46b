"""Global latent sites (outside the data plate) in the log-weight core, the objectives and
the nested estimator, on a conjugate model where everything is closed-form (float64):

    theta ~ N(0, tau^2 I_D)             global: a shared offset (PPCA's mean with a prior)
    z_n ~ N(0, I_q)                      local
    x_n | z_n, theta ~ N(A z_n + theta, sigma^2 I_D)

Given theta, x_n ~ N(theta, C) with C = A A^T + sigma^2 I; the posterior of theta is
N(m, V), V = (I / tau^2 + N C^-1)^-1, m = V C^-1 sum_n x_n, and the posterior predictive is
x* | X ~ N(m, C + V). The local posterior given theta is PPCA's, N(M^-1 A^T (x - theta),
sigma^2 M^-1) with M = A^T A + sigma^2 I. With both guides exact, every ELBO and IWAE
sample equals log p(X), and the nested estimator averages exact p(x* | theta_s).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from inference.config import EvalConfig, ObjectiveConfig
from inference.estimators import estimate_dataset, model_global_sites, nested
from inference.logweights import compute_log_weights
from inference.objective import make_objective
from inference.objectives import ELBO, IWAE, LogWeightObjective, ScoreFunctionELBO
from models.base import DataSpec, DGMError, GenerativeModel

D, Q, N, TAU = 3, 2, 12, 1.5

pytestmark = pytest.mark.usefixtures("one_thread")


class OffsetPPCA(GenerativeModel):
    """The conjugate model of the module docstring; its guide is ``q(theta) = N(m, L L^T)``
    and ``q(z | x, theta) = N(P (x - theta), Lz Lz^T)``, exact at :meth:`set_exact`."""

    name = "offset_ppca_test"

    def __init__(self):
        super().__init__(DataSpec((D,), "real"))
        g = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(torch.randn(D, Q, generator=g))
        self.log_sigma = nn.Parameter(torch.tensor(-0.3))
        self.m = nn.Parameter(0.1 * torch.randn(D, generator=g))
        self.L = nn.Parameter(0.5 * torch.eye(D) + 0.05 * torch.randn(D, D, generator=g).tril(-1))
        self.P = nn.Parameter(0.1 * torch.randn(Q, D, generator=g))
        self.Lz = nn.Parameter(0.7 * torch.eye(Q))

    def model(self, x, idx=None, size=None):
        theta = pyro.sample("theta", dist.Normal(x.new_zeros(D), TAU).to_event(1))
        with self.data_plate(x, idx, size):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Q), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.A.T + theta, self.log_sigma.exp()).to_event(1), obs=x)

    def guide(self, x, idx=None, size=None):
        theta = pyro.sample("theta", dist.MultivariateNormal(self.m, scale_tril=self.L.tril()))
        with self.data_plate(x, idx, size):
            pyro.sample("z", dist.MultivariateNormal((x - theta) @ self.P.T, scale_tril=self.Lz.tril()))

    # --- closed forms ------------------------------------------------------------------
    def C(self):
        return self.A @ self.A.T + self.log_sigma.exp() ** 2 * torch.eye(D)

    def posterior(self, x):
        """``(m, V)`` of ``p(theta | x)``."""
        c_inv = torch.linalg.inv(self.C())
        V = torch.linalg.inv(torch.eye(D) / TAU**2 + x.shape[0] * c_inv)
        return V @ c_inv @ x.sum(0), V

    @torch.no_grad()
    def log_evidence(self, x):
        """``log p(X) = log p(X | theta) + log p(theta) - log p(theta | X)`` at theta = m."""
        m, V = self.posterior(x)
        lik = dist.MultivariateNormal(m, self.C()).log_prob(x).sum()
        prior = dist.Normal(torch.zeros(D), TAU).log_prob(m).sum()
        return lik + prior - dist.MultivariateNormal(m, V).log_prob(m)

    @torch.no_grad()
    def predictive(self, x_test, x):
        m, V = self.posterior(x)
        return dist.MultivariateNormal(m, self.C() + V).log_prob(x_test)

    @torch.no_grad()
    def set_exact(self, x):
        m, V = self.posterior(x)
        s2 = self.log_sigma.exp() ** 2
        M = self.A.T @ self.A + s2 * torch.eye(Q)
        M_inv = torch.linalg.inv(M)
        self.m.copy_(m)
        self.L.copy_(torch.linalg.cholesky(V))
        self.P.copy_(M_inv @ self.A.T)
        self.Lz.copy_(torch.linalg.cholesky(s2 * M_inv))


def _data(model, n=N, seed=3):
    g = torch.Generator().manual_seed(seed)
    theta = TAU * torch.randn(D, generator=g)
    z = torch.randn(n, Q, generator=g)
    return (z @ model.A.T + theta + model.log_sigma.exp() * torch.randn(n, D, generator=g)).detach()


def _loss_and_grads(loss_fn, model, *args):
    model.zero_grad()
    loss = loss_fn(model.model, model.guide, *args)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize("k", [1, 3])
def test_elbo_loss_and_gradients_equal_pyro_trace_elbo_with_a_global_latent_under_subsampling(float64, k):
    """A minibatch of B = 5 rows of N = 12: local terms scaled by N / B, the global term
    once; value and every gradient (model and guide) equal Trace_ELBO's, same seed."""
    model = OffsetPPCA()
    x = _data(model)
    idx = torch.tensor([4, 0, 9, 7, 2])
    ours, pyros = [], []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        ours.append(_loss_and_grads(ELBO(k, max_plate_nesting=1).differentiable_loss, model, x[idx], idx, N))
        pyro.set_rng_seed(seed)
        trace_elbo = pyro.infer.Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        pyros.append(_loss_and_grads(trace_elbo.differentiable_loss, model, x[idx], idx, N))
    for (loss, grads), (ref, ref_grads) in zip(ours, pyros):
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    assert ours[0][0] != ours[1][0]  # the seeds matter: the comparison is sample for sample


def test_score_function_elbo_value_equals_trace_elbo_and_its_global_gradient_is_unbiased(float64):
    """elbo-sf detaches every draw (theta included): its value is Trace_ELBO's; its
    gradient on q(theta)'s mean, from the score function with the particle's whole
    log-weight as signal, matches the pathwise gradient in expectation."""
    model = OffsetPPCA()
    x = _data(model, n=4)
    sf = ScoreFunctionELBO(1, decay=None, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    value = sf.differentiable_loss(model.model, model.guide, x)
    pyro.set_rng_seed(0)
    ref = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)

    def grad_m(objective, seed):
        pyro.set_rng_seed(seed)
        return torch.autograd.grad(objective.differentiable_loss(model.model, model.guide, x), model.m)[0]

    sf_k = ScoreFunctionELBO(20000, decay=None, max_plate_nesting=1)
    g_sf = torch.stack([grad_m(sf_k, seed) for seed in range(8)])
    g_sf, se = g_sf.mean(0), g_sf.std(0) / math.sqrt(len(g_sf))
    g_path = grad_m(ELBO(40000, max_plate_nesting=1), 100)
    assert g_path.abs().max() > 10.0  # far from the optimum: a gradient to get right
    assert torch.all((g_sf - g_path).abs() < 4 * se + 0.2), (g_sf, se, g_path)


def test_with_exact_guides_elbo_and_iwae_equal_log_evidence_for_every_draw(float64):
    """Exact posterior guides make log p(X, theta, Z) - log q(theta, Z) = log p(X) for every
    draw. IWAE shares one theta over its K particles, so it is exact too; a theta per
    particle inside the logsumexp would not be (it is no bound on log p(X))."""
    model = OffsetPPCA()
    x = _data(model)
    model.set_exact(x)
    log_px = model.log_evidence(x)
    for objective in (ELBO(1), ELBO(4), IWAE(1), IWAE(5)):
        for seed in range(3):
            pyro.set_rng_seed(seed)
            loss = objective.differentiable_loss(model.model, model.guide, x)
            torch.testing.assert_close(-loss, log_px, rtol=0, atol=1e-9)
    lw = compute_log_weights(model.model, model.guide, (x,), num_particles=5, global_draws=1)
    assert lw.global_sites == ("theta",) and lw.global_log_ratio.shape == (5,)
    assert torch.all(lw.global_log_ratio == lw.global_log_ratio[0])  # one shared draw


def test_iwae_bound_lies_between_the_elbo_and_log_evidence_and_grows_with_k(float64):
    """Away from the exact guide: E[ELBO] <= E[IWAE_K] <= E[IWAE_K'] <= log p(X), K < K'."""
    model = OffsetPPCA()
    x = _data(model)
    log_px = float(model.log_evidence(x))
    means = []
    with torch.no_grad():
        for k in (1, 5, 50):
            pyro.set_rng_seed(0)
            vals = torch.stack([-IWAE(k).differentiable_loss(model.model, model.guide, x) for _ in range(100)])
            means.append((float(vals.mean()), float(vals.std() / math.sqrt(len(vals)))))
    (e1, s1), (e5, s5), (e50, s50) = means
    assert e1 + 3 * (s1 + s5) < e5 and e5 + 3 * (s5 + s50) < e50 < log_px


def test_iwae_with_one_particle_is_the_elbo_with_globals(float64):
    model = OffsetPPCA()
    x = _data(model)
    pyro.set_rng_seed(0)
    a = _loss_and_grads(IWAE(1).differentiable_loss, model, x)
    pyro.set_rng_seed(0)
    b = _loss_and_grads(ELBO(1).differentiable_loss, model, x)
    torch.testing.assert_close(a[0], b[0])
    for g, r in zip(a[1], b[1]):
        torch.testing.assert_close(g, r)


def test_objectives_without_a_global_term_refuse_global_sites_naming_them(float64):
    class NoGlobals(LogWeightObjective):
        def per_datapoint(self, lw):
            return lw.log_w.mean(0)

    model = OffsetPPCA()
    x = _data(model)
    with pytest.raises(DGMError, match=r"outside the 'data' plate \(theta\)"):
        NoGlobals(1).differentiable_loss(model.model, model.guide, x)
    warm = make_objective(ObjectiveConfig(name="elbo", kl_warmup=10))
    with pytest.raises(DGMError, match="KL annealing and free bits does not support .*theta"):
        warm.differentiable_loss(model.model, model.guide, x)


def test_is_estimator_refuses_global_sites_and_auto_picks_nested(float64):
    model = OffsetPPCA()
    x = _data(model)
    assert model_global_sites(model) == ("theta",)
    with pytest.raises(DGMError, match="use --estimator nested"):
        estimate_dataset(model, x, method="is", num_samples=10, progress=False)
    est = estimate_dataset(model, x, method="auto", num_samples=2, progress=False)
    assert est.method == "nested"


@pytest.mark.parametrize("local", ["exact", "prior"])
def test_nested_estimator_converges_to_the_exact_posterior_predictive(float64, local):
    """q(theta) the exact posterior given the training data X; test points x*: the nested
    estimate of log p(x* | X) is within 3 standard errors of N(x*; m, C + V), per point
    and on average; with the exact local guide each p_hat_s is p(x* | theta_s) exactly,
    with local proposals from the prior it is an IS estimate over K = 200 samples."""
    model = OffsetPPCA()
    x = _data(model)
    model.set_exact(x)
    x_test = _data(model, n=6, seed=7)
    exact = model.predictive(x_test, x)

    if local == "exact":
        guide, k = model.guide, 1
    else:

        def guide(x, idx=None, size=None):  # q(theta) exact, z from the prior
            pyro.sample("theta", dist.MultivariateNormal(model.m, scale_tril=model.L.tril()))

        k = 200
    pyro.set_rng_seed(0)
    with torch.no_grad():
        est = nested(model.model, guide, x_test, num_samples=k, global_samples=3000)
    assert est.method == "nested" and est.log_px.shape == (6,)
    err = (est.log_px - exact).abs()
    assert torch.all(err < 3 * est.stderr + 1e-3), (err, est.stderr)
    assert float(est.stderr.max()) < 0.05  # converged: the check is not vacuous
    # with a wrong q(theta) (the prior) the estimate is another number: the test has power
    with torch.no_grad():
        off = nested(model.model, lambda x, idx=None, size=None: None, x_test, num_samples=k, global_samples=3000)
    assert float((off.log_px - exact).abs().max()) > 0.5


def test_nested_estimator_through_the_registry_with_fixed_globals_over_local_chunks(float64):
    """When K * B exceeds the row budget each global draw is held fixed over chunks of
    local samples; the estimate is the same quantity (exact guides: each p_hat_s exact)."""
    model = OffsetPPCA()
    x = _data(model)
    model.set_exact(x)
    x_test = _data(model, n=4, seed=9)
    exact = model.predictive(x_test, x)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        est = nested(model.model, model.guide, x_test, num_samples=8, global_samples=150, max_rows=16)
    assert torch.all((est.log_px - exact).abs() < 3 * est.stderr + 1e-3)
    summary = estimate_dataset(
        model,
        x_test,
        estimator=None,
        method="nested",
        num_samples=4,
        progress=False,
    ).summary()
    assert summary["estimator"] == "nested"
    assert EvalConfig(estimator="nested", global_samples=7).global_samples == 7


# --- the example model: a VAE with a Bayesian decoder output layer -------------------------
def _bayes_vae(latent=3, hidden=8, dim=6):
    from models.latent.bayes_vae import BayesVAE, BayesVAEConfig

    config = BayesVAEConfig(latent_dim=latent, encoder_hidden=(hidden,), decoder_hidden=(hidden,), prior_scale=0.7)
    return BayesVAE(DataSpec((dim,), "binary"), config)


def test_bayes_vae_output_layer_is_h_w_plus_b_for_shared_and_per_particle_weights(float64):
    from models.latent.bayes_vae import output_layer

    h = torch.randn(4, 5, 3)  # [P, B, H]
    w, b = torch.randn(4, 1, 3, 2), torch.randn(4, 1, 2)  # one draw per particle
    expected = torch.einsum("pbh,pho->pbo", h, w[:, 0]) + b
    torch.testing.assert_close(output_layer(h, w, b), expected)
    shared = output_layer(h, w[:1], b[:1])  # one draw for all particles
    torch.testing.assert_close(shared, torch.einsum("pbh,ho->pbo", h, w[0, 0]) + b[0])
    torch.testing.assert_close(output_layer(h[0], w[0, 0], b[0, 0]), h[0] @ w[0, 0] + b[0, 0])


def test_bayes_vae_global_term_is_minus_the_kl_of_its_weight_guide(float64):
    """The decoder weights are global: their term, averaged over particles, estimates
    -KL(q(W, b) || p(W, b)) (closed form for the mean-field Gaussians), counted once."""
    model = _bayes_vae()
    x = torch.bernoulli(torch.full((7, 6), 0.4))
    with torch.no_grad():
        lw = compute_log_weights(model.model, model.guide, (x,), num_particles=4000)
        kl = sum(
            torch.distributions.kl_divergence(q, p).sum()
            for q, p in zip(model.weight_posterior(), model.weight_prior())
        )
    assert lw.global_sites == ("decoder_w", "decoder_b") and lw.log_w.shape == (4000, 7)
    ratio = lw.global_log_ratio
    assert abs(float(ratio.mean() + kl)) < 4 * float(ratio.std() / math.sqrt(len(ratio)))


def test_bayes_vae_trains_with_elbo_and_iwae_and_evaluates_with_the_nested_estimator(tmp_path, capsys):
    """A few steps on digits from the CLI (preset small); auto evaluation is nested, and
    ``dgm eval`` takes the nested estimator's ``--global-samples``."""
    import json

    from experiments.cli import main

    tiny = ["--data", "digits", "--preset", "small", "--epochs", "1", "--max-steps", "4", "--device", "cpu"]
    tiny += ["--eval-k", "3", "--eval-limit", "5", "--eval-global-samples", "4", "--no-progress"]
    for objective in ("elbo", "iwae"):
        run = tmp_path / objective
        assert main(["train", "bayes_vae", *tiny, "--objective", objective, "--k", "2", "--run-dir", str(run)]) == 0
        summary = json.loads((run / "summary.json").read_text())
        test = summary.get("test", summary)
        assert test["estimator"] == "nested" and test["settings"] == {"K": 3, "global_samples": 4}
        assert math.isfinite(test["nll"]) and test["nll"] > 0
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "2", "--global-samples", "3", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    evaluated = json.loads(out[out.index("{") :])
    assert evaluated["estimator"] == "nested" and evaluated["settings"] == {"K": 2, "global_samples": 3}


def test_enumerated_elbo_counts_global_terms_once_and_equals_trace_enum_elbo(float64):
    """A mixture whose component means are a global latent (q(theta) a Gaussian) and whose
    assignments are summed out in the model: elbo-enum's loss and gradients equal
    TraceEnum_ELBO's under subsampling, same seed."""
    from inference.enum import EnumELBO

    means_loc = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    means_scale = torch.tensor([0.3, 0.2, 0.4], requires_grad=True)
    logits = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)

    def model(x, idx=None, size=None):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 2.0).to_event(1))
        with pyro.plate("data", size or x.shape[0], subsample=idx, dim=-1):
            z = pyro.sample("z", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(theta[..., z] if theta.dim() > 1 else theta[z], 1.0), obs=x)

    def guide(x, idx=None, size=None):
        pyro.sample("theta", dist.Normal(means_loc, means_scale).to_event(1))

    x = torch.tensor([-1.2, 0.3, 2.2, 1.9, -0.8, 0.1])
    idx = torch.tensor([5, 1, 3])
    params = [means_loc, means_scale, logits]
    pyro.set_rng_seed(0)
    ours = EnumELBO(1, max_plate_nesting=1).differentiable_loss(model, guide, x[idx], idx, 6)
    pyro.set_rng_seed(0)
    ref = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x[idx], idx, 6)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_flow_guides_flow_the_local_latents_and_leave_global_ones_to_the_base_guide():
    """A flow guide is amortized per datapoint: on bayes_vae it flows z only; q(W, b) is the
    model's own, so the global term is the same as the amortized guide's, draw for draw."""
    from inference.guides import build_guide

    model = _bayes_vae()
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    flow = build_guide("iaf", model, x)
    assert set(flow.site_shapes) == {"z"}
    pyro.set_rng_seed(0)
    with torch.no_grad():
        flowed = compute_log_weights(model.model, flow, (x,), num_particles=3)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        plain = compute_log_weights(model.model, model.guide, (x,), num_particles=3)
    torch.testing.assert_close(flowed.global_log_ratio, plain.global_log_ratio)
