"""The fused pieces of the training step (issue 15's SVI overhead): the VAE family's
``DiagonalNormal`` / ``StandardNormal`` against ``Normal(loc, scale).to_event(1)``, and
``IndexedPlate`` (a plate without Pyro's subsample site) against ``pyro.plate``, down to
the loss and gradients of a VAE's training step."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from inference.objectives import ELBO, IWAE
from models.base import DATA_PLATE, DataSpec, GenerativeModel, IndexedPlate
from models.latent.gaussian import DiagonalNormal, StandardNormal, diagonal_normal, standard_normal
from models.latent.vae import PRESETS, VAE

L = 5


def _pair(batch=(3,), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(batch + (L,), generator=g, dtype=dtype)
    scale = torch.rand(batch + (L,), generator=g, dtype=dtype) + 0.1
    return DiagonalNormal(loc, scale), dist.Normal(loc, scale).to_event(1)


def test_diagonal_normal_is_normal_to_event_in_density_samples_moments_and_expand():
    q, ref = _pair()
    z = torch.randn(4, 3, L)
    assert torch.equal(q.log_prob(z), ref.log_prob(z))  # the same arithmetic: bit for bit
    for shape in ((2, 3), (1, 3)):
        e, r = q.expand(shape), ref.expand(shape)
        assert isinstance(e, DiagonalNormal) and e.batch_shape == r.batch_shape and e.event_shape == (L,)
        assert torch.equal(e.log_prob(z[:2]), r.log_prob(z[:2]))
        torch.manual_seed(5)
        a = e.rsample((2,))
        torch.manual_seed(5)
        assert torch.equal(a, r.rsample((2,)))  # the same random stream, bit for bit
    assert torch.equal(q.mean, ref.mean) and torch.equal(q.variance, ref.variance)
    assert isinstance(q.base_dist, dist.Normal) and q.has_rsample


def test_diagonal_normal_carries_the_gradient_of_normal_to_event():
    loc = torch.randn(3, L, requires_grad=True)
    raw = torch.randn(3, L, requires_grad=True)
    z = torch.randn(3, L)
    scale = torch.nn.functional.softplus(raw) + 1e-4
    grads = []
    for d in (DiagonalNormal(loc, scale), dist.Normal(loc, scale).to_event(1)):
        torch.manual_seed(1)
        (d.log_prob(z).sum() + d.rsample().pow(2).sum()).backward(retain_graph=True)
        grads.append((loc.grad.clone(), raw.grad.clone()))
        loc.grad, raw.grad = None, None
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_standard_normal_is_normal_0_1_to_event_and_broadcasts_like_it():
    like = torch.zeros(2)
    p = standard_normal(like, L)
    ref = dist.Normal(torch.zeros(L), 1.0).to_event(1)
    z = torch.randn(4, 3, L, requires_grad=True)
    assert torch.equal(p.log_prob(z), ref.log_prob(z))
    e, r = p.expand((4, 3)), ref.expand((4, 3))
    assert isinstance(e, StandardNormal) and e.batch_shape == (4, 3)
    assert torch.equal(e.log_prob(z), r.log_prob(z))
    (g,) = torch.autograd.grad(e.log_prob(z).sum(), z)
    assert torch.equal(g, torch.autograd.grad(r.log_prob(z).sum(), z)[0])
    # a value with fewer batch dims than the distribution: broadcast to the batch, as Normal does
    assert e.log_prob(z[0]).shape == r.log_prob(z[0]).shape == (4, 3)
    torch.manual_seed(2)
    a = e.rsample()
    torch.manual_seed(2)
    assert torch.equal(a, r.rsample())
    assert p.sample((6,)).shape == (6, L) and standard_normal(like.double(), L).sample().dtype == torch.float64
    # it integrates to one: a grid over one dimension (L = 1)
    grid = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    mass = torch.trapezoid(standard_normal(grid, 1).log_prob(grid[:, None]).exp(), grid)
    assert abs(mass.item() - 1.0) < 1e-8


def test_closed_form_kl_matches_the_normal_kl_and_monte_carlo():
    q, ref = _pair((2, 3), torch.float64)
    p = standard_normal(q.loc, L).expand((2, 3))
    ref_p = dist.Normal(torch.zeros(L, dtype=torch.float64), 1.0).to_event(1).expand((2, 3))
    kl = kl_divergence(q, p)
    assert kl.shape == (2, 3)
    assert torch.equal(kl, kl_divergence(ref, ref_p))
    torch.manual_seed(0)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert torch.allclose(kl, mc, atol=0.05)
    # a prior with fewer batch dims than the posterior: broadcast, as the generic KL does
    assert kl_divergence(q, standard_normal(q.loc, L).expand((3,))).shape == (2, 3)


def test_diagonal_normal_from_encoder_output():
    params = torch.randn(3, 2 * L)
    q = diagonal_normal(params, 1e-4)
    loc, raw = params.chunk(2, -1)
    assert torch.equal(q.loc, loc) and torch.equal(q.scale, torch.nn.functional.softplus(raw) + 1e-4)


# --- IndexedPlate -----------------------------------------------------------------------------


def _frames(plate_fn):
    seen = {}

    def program():
        with plate_fn() as ind:
            seen["indices"] = ind
            pyro.sample("z", dist.Normal(0.0, 1.0))

    tr = poutine.trace(program).get_trace()
    return tr, seen["indices"]


def test_indexed_plate_has_pyro_plates_frame_scale_and_indices_but_no_subsample_site():
    idx = torch.tensor([7, 2, 9])
    ours, our_ind = _frames(lambda: IndexedPlate(DATA_PLATE, 20, dim=-1, subsample=idx))
    ref, ref_ind = _frames(lambda: pyro.plate(DATA_PLATE, 20, subsample=idx, dim=-1))
    assert torch.equal(our_ind, ref_ind)
    a, b = ours.nodes["z"], ref.nodes["z"]
    assert a["cond_indep_stack"] == b["cond_indep_stack"]
    assert a["scale"] == b["scale"] == 20 / 3
    assert a["fn"].batch_shape == b["fn"].batch_shape == (3,)
    assert DATA_PLATE in ref.nodes and DATA_PLATE not in ours.nodes
    # without a subsample: every index, scale 1
    full, ind = _frames(lambda: IndexedPlate(DATA_PLATE, 4, dim=-1))
    assert torch.equal(ind, torch.arange(4)) and full.nodes["z"]["scale"] == 1.0


def _old_diagonal_normal(params, min_scale):
    loc, raw = params.chunk(2, -1)
    return dist.Normal(loc, torch.nn.functional.softplus(raw) + min_scale).to_event(1)


def _old_plate(self, x, idx=None, size=None):
    return pyro.plate(DATA_PLATE, size if size is not None else x.shape[0], subsample=idx, dim=-1)


@pytest.mark.parametrize("objective", [ELBO(1), ELBO(1, analytic_kl=True), IWAE(5)], ids=["elbo", "elbo-kl", "iwae5"])
def test_a_vae_training_step_is_unchanged_by_the_fused_parts(objective, monkeypatch):
    """The loss and every gradient of one step, from the same seed, with today's parts and
    with ``pyro.plate`` and ``Normal(...).to_event(1)`` in their place: bit for bit, so
    training runs (and the README's numbers) are unchanged by them."""
    torch.manual_seed(0)
    model = VAE(DataSpec((784,), "binary"), PRESETS["mlp-400-20"])
    x = (torch.rand(16, 784) < 0.5).float()
    idx, n = torch.randperm(1000)[:16], 1000
    results = []
    for old in (False, True):
        m = copy.deepcopy(model)
        if old:
            monkeypatch.setattr(GenerativeModel, "data_plate", _old_plate)
            monkeypatch.setattr(
                VAE, "prior", lambda self, like: dist.Normal(like.new_zeros(L_VAE), 1.0).expand([L_VAE]).to_event(1)
            )
            monkeypatch.setattr("models.latent.vae.diagonal_normal", _old_diagonal_normal)
        torch.manual_seed(3)
        loss, _ = objective.loss_terms(m.model, m.guide, x, idx, n)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    for u, v in zip(ga, gb):
        assert torch.equal(u, v)


L_VAE = PRESETS["mlp-400-20"].latent_dim
