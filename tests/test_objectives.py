"""Objectives against Pyro's reference ELBOs, closed forms and bound orderings."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from inference.config import ObjectiveConfig
from inference.logweights import compute_log_weights
from inference.objective import make_objective
from inference.objectives import ELBO, IWAE, ScoreFunctionELBO
from models.base import DataSpec, DGMError, GenerativeModel
from models.latent.ppca import PPCA, PPCAConfig
from models.latent.vae import VAE, VAEConfig


def small_vae():
    return VAE(DataSpec((12,), "binary"), VAEConfig(latent_dim=3, encoder_hidden=(7,), decoder_hidden=(7,)))


def grads(module, loss):
    module.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def pyro_grads(module, elbo, pm, pg, *args):
    module.zero_grad()
    pyro.set_rng_seed(0)
    value = elbo.loss_and_grads(pm, pg, *args)
    return value, torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.fixture
def vae_batch(float64):
    m = small_vae()
    x = torch.bernoulli(torch.full((5, 12), 0.3))
    idx = torch.tensor([0, 3, 5, 7, 9])
    return m, x, idx, 10


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda k: ELBO(k), lambda k: pyro.infer.Trace_ELBO(k, 2, vectorize_particles=True)),
        (lambda k: ELBO(k, analytic_kl=True), lambda k: pyro.infer.TraceMeanField_ELBO(k, 2, vectorize_particles=True)),
        (
            lambda k: ScoreFunctionELBO(k, decay=None),
            lambda k: pyro.infer.TraceGraph_ELBO(k, 2, vectorize_particles=True),
        ),
    ],
    ids=["Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO"],
)
def test_values_and_gradients_equal_pyro(vae_batch, k, ours, theirs):
    m, x, idx, n = vae_batch
    pm, pg = m.svi_pair()
    if isinstance(ours(k), ScoreFunctionELBO):
        pg = _non_reparam(pg)
    pyro.set_rng_seed(0)
    loss = ours(k).differentiable_loss(m.model, m.guide, x, idx, n)
    g_ours = grads(m, loss)
    value, g_pyro = pyro_grads(m, theirs(k), pm, pg, x, idx, n)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(g_ours, g_pyro, rtol=1e-9, atol=1e-11)


def _non_reparam(guide):
    """Pyro's TraceGraph_ELBO uses score-function terms only for non-reparameterized sites."""

    def wrapped(*args, **kwargs):
        with _NoRsample():
            return guide(*args, **kwargs)

    return wrapped


class _NoRsample(pyro.poutine.messenger.Messenger):
    def _pyro_sample(self, msg):
        if not msg["is_observed"] and msg["name"] == "z":
            msg["fn"] = _Detached(msg["fn"])


class _Detached(dist.TorchDistribution):
    """Wraps a distribution so that it has no rsample (samples are detached)."""

    def __init__(self, base):
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    has_rsample = False
    support = dist.constraints.real_vector

    def sample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape).detach()

    def log_prob(self, value):
        return self.base.log_prob(value)

    def expand(self, batch_shape, _instance=None):
        return _Detached(self.base.expand(batch_shape))


@pytest.mark.parametrize("k", [1, 5])
def test_iwae_equals_pyro_renyi_alpha0_for_one_datapoint(vae_batch, k):
    m, x, _, _ = vae_batch
    x1 = x[:1]
    pm, pg = m.svi_pair()
    pyro.set_rng_seed(0)
    loss = IWAE(k).differentiable_loss(m.model, m.guide, x1)
    g_ours = grads(m, loss)
    value, g_pyro = pyro_grads(
        m, pyro.infer.RenyiELBO(alpha=0, num_particles=k, max_plate_nesting=2, vectorize_particles=True), pm, pg, x1
    )
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(g_ours, g_pyro, rtol=1e-9, atol=1e-11)


def test_iwae_is_per_datapoint_and_scaled_by_the_plate(vae_batch):
    """The minibatch IWAE is sum_b [logsumexp_k log w_kb - log K] * N / B: computed by hand
    from the same log-weights."""
    m, x, idx, n = vae_batch
    pyro.set_rng_seed(3)
    loss = IWAE(6).differentiable_loss(m.model, m.guide, x, idx, n)
    pyro.set_rng_seed(3)
    lw = compute_log_weights(m.model, m.guide, (x, idx, n), num_particles=6).log_w
    expected = -(n / x.shape[0]) * (torch.logsumexp(lw, 0) - math.log(6)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_iwae_k1_equals_elbo(vae_batch):
    m, x, idx, n = vae_batch
    pyro.set_rng_seed(1)
    a = IWAE(1).differentiable_loss(m.model, m.guide, x, idx, n)
    ga = grads(m, a)
    pyro.set_rng_seed(1)
    b = ELBO(1).differentiable_loss(m.model, m.guide, x, idx, n)
    gb = grads(m, b)
    assert a.item() == b.item()
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def ppca_with_poor_guide(d=5, q=2, seed=0):
    torch.manual_seed(seed)
    spec = DataSpec((d,), "real")
    m = PPCA(spec, PPCAConfig(latent_dim=q))
    m.set_params(torch.randn(d, q), torch.randn(d), 0.3)
    a, b, tril = m.posterior_affine()
    m.encoder.set_affine(0.5 * a, b + 0.5, 1.5 * tril)  # a deliberately poor proposal
    return m


def test_iwae_bound_orders_with_k_and_stays_below_log_px(float64):
    """E[ELBO] <= E[IWAE_2] <= ... <= E[IWAE_64] <= log p(x), each mean over 4,000 replicates."""
    m = ppca_with_poor_guide()
    x = m.sample(3)
    exact = m.log_prob(x)
    reps = 4000
    means, ses = [], []
    for k in (1, 2, 4, 8, 16, 32, 64):
        lw = compute_log_weights(m.model, m.guide, (x,), num_particles=k * reps).log_w.detach()
        bounds = torch.logsumexp(lw.reshape(reps, k, -1), 1) - math.log(k)  # [reps, B]
        means.append(bounds.mean(0))
        ses.append(bounds.std(0) / math.sqrt(reps))
    for i in range(1, len(means)):
        assert (means[i] - means[i - 1] > -3 * (ses[i] + ses[i - 1])).all(), f"IWAE decreased at step {i}"
    assert (means[-1] - means[0] > 0.05).all()  # the poor guide leaves a visible gap
    assert (means[-1] <= exact + 3 * ses[-1]).all()
    assert (means[0] < exact).all()


def test_reparameterized_and_score_function_gradients_agree_with_closed_form(float64):
    """z ~ N(0, 1), x | z ~ N(z, 1), q(z) = N(m, s^2). The ELBO is
    -0.5 (x - m)^2 - 0.5 s^2 - 0.5 (m^2 + s^2) + log s + const, so
    dELBO/dm = (x - m) - m and dELBO/ds = -2 s + 1 / s."""
    x = torch.tensor([[0.7]])

    class Gauss(GenerativeModel):
        def __init__(self):
            super().__init__(DataSpec((1,), "real"))
            self.m = nn.Parameter(torch.tensor(0.2))
            self.s = nn.Parameter(torch.tensor(0.8))

        def model(self, x, idx=None, size=None):
            with self.data_plate(x, idx, size):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

        def guide(self, x, idx=None, size=None):
            with self.data_plate(x, idx, size):
                pyro.sample("z", dist.Normal(self.m, self.s).expand([1]).to_event(1))

    g = Gauss()
    exact = torch.tensor([(0.7 - 0.2) - 0.2, -2 * 0.8 + 1 / 0.8])
    for objective in (ELBO(20000), ScoreFunctionELBO(20000, decay=None), ScoreFunctionELBO(20000, decay=0.5)):
        runs = []
        for r in range(20):
            pyro.set_rng_seed(r)
            g.zero_grad()
            objective.differentiable_loss(g.model, g.guide, x).backward()
            runs.append(-torch.stack([g.m.grad, g.s.grad]))
        runs = torch.stack(runs)
        mean, se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
        assert ((mean - exact).abs() < 4 * se + 1e-3).all(), (type(objective).__name__, mean, exact, se)


def test_score_function_baseline_reduces_variance(float64):
    m = ppca_with_poor_guide()
    x = m.sample(4)
    spreads = {}
    for name, objective in (("none", ScoreFunctionELBO(1, decay=None)), ("average", ScoreFunctionELBO(1, decay=0.9))):
        gs = []
        for r in range(300):
            pyro.set_rng_seed(r)
            m.zero_grad()
            objective.differentiable_loss(m.model, m.guide, x).backward()
            gs.append(m.encoder.b.grad.clone())
        spreads[name] = torch.stack(gs[50:]).var(0).sum()
    assert spreads["average"] < 0.5 * spreads["none"]


def test_neural_baseline_is_trained_and_registered_for_svi(float64):
    m = ppca_with_poor_guide()
    x = m.sample(8)
    objective = ScoreFunctionELBO(4, neural_baseline=True, input_dim=5)
    pm, pg = m.svi_pair()
    svi = pyro.infer.SVI(pm, pg, pyro.optim.Adam({"lr": 1e-2}), objective)
    before = objective.net[-1].bias.detach().clone()
    for _ in range(5):
        svi.step(x)
    assert "sf_baseline$$$2.bias" in pyro.get_param_store().keys()
    assert not torch.equal(before, objective.net[-1].bias.detach())


def test_make_objective_rejects_bad_settings():
    with pytest.raises(DGMError, match="unknown objective"):
        make_objective(ObjectiveConfig(name="elbow"))
    with pytest.raises(DGMError, match="--k must be >= 1"):
        make_objective(ObjectiveConfig(name="iwae", k=0))
    with pytest.raises(DGMError, match="baseline"):
        make_objective(ObjectiveConfig(name="elbo-sf", baseline="magic"))
