"""KL annealing and free bits (inference.schedules) through the objectives and the runner:
the objective's KL term against independent computations, gradients through floored
groups, the plain ELBO when the schedule is inactive, and exact resume."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from experiments import data as datasets
from inference.config import ObjectiveConfig
from inference.logweights import compute_log_weights
from inference.objective import make_objective
from inference.objectives import ELBO, IWAE
from inference.runner import Runner, TrainConfig
from inference.schedules import FreeBits, KLSchedule, LinearWarmup, make_schedule
from models.base import DataSpec, DGMError
from models.latent.vae import VAE, VAEConfig
from models.latent.vae2 import VAE2, VAE2Config

D, L, B, N = 6, 4, 16, 160


def _vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    cfg = VAEConfig(latent_dim=L, encoder_hidden=(8,), decoder_hidden=(8,))
    return VAE(DataSpec((D,), "binary"), cfg).double()


def _vae2(seed: int = 0) -> VAE2:
    torch.manual_seed(seed)
    return VAE2(DataSpec((D,), "binary"), VAE2Config(h1_dim=3, h2_dim=2, hidden1=(8,), hidden2=(4,))).double()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((B, D), 0.4, dtype=torch.float64), generator=g)
    return x, torch.arange(B), N


def _loss(objective, model, seed: int = 5):
    pyro.set_rng_seed(seed)
    return objective.loss_terms(model.model, model.guide, *_batch())


def _at(schedule: KLSchedule, step: int) -> KLSchedule:
    schedule.set_step(step)
    return schedule


# --- the schedule itself -------------------------------------------------------------------------
def test_linear_warmup_follows_its_formula():
    w = LinearWarmup(beta0=0.2, steps=100)
    for step in (0, 1, 37, 50, 99):
        assert w(step) == pytest.approx(0.2 + 0.8 * step / 100, abs=1e-15)
    assert w(100) == 1.0 and w(10_000) == 1.0
    assert LinearWarmup(beta0=0.0, steps=0)(0) == 1.0
    schedule = KLSchedule(w)
    assert [_at(schedule, s).beta for s in (0, 50, 100)] == [pytest.approx(0.2), pytest.approx(0.6), 1.0]
    state = schedule.state_dict()
    fresh = KLSchedule(LinearWarmup(0.2, 100))
    fresh.load_state_dict(state)
    assert fresh.step == 100 and fresh.beta == 1.0


def test_bad_schedules_and_unsupported_objectives_are_dgm_errors():
    with pytest.raises(DGMError, match="kl-warmup"):
        LinearWarmup(steps=-1)
    with pytest.raises(DGMError, match="kl-beta0"):
        LinearWarmup(beta0=1.5, steps=10)
    with pytest.raises(DGMError, match="free-bits"):
        FreeBits(-0.1)
    with pytest.raises(DGMError, match="free-bits-per"):
        FreeBits(0.5, per="pixel")
    bits = make_schedule(free_bits=0.5)
    with pytest.raises(DGMError, match="ELBO"):
        make_objective(ObjectiveConfig(name="iwae", k=5)).set_schedule(bits)
    with pytest.raises(DGMError, match="ELBO"):
        make_objective(ObjectiveConfig(name="elbo-sf", k=1)).set_schedule(bits)
    with pytest.raises(DGMError, match="elbo-enum"):
        make_objective(ObjectiveConfig(name="elbo-enum", k=1, kl_warmup=10))
    assert make_schedule() is None  # no flags: the plain objective


# --- annealing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("analytic_kl", [False, True])
def test_beta_one_without_free_bits_is_the_plain_elbo_exactly(float64, analytic_kl):
    model = _vae()
    plain_loss, plain_terms = _loss(ELBO(3, analytic_kl=analytic_kl), model)
    plain_grads = torch.autograd.grad(plain_loss, list(model.parameters()))
    scheduled = ELBO(3, analytic_kl=analytic_kl).set_schedule(_at(make_schedule(warmup_steps=10, beta0=0.1), 10))
    loss, terms = _loss(scheduled, model)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert terms["beta"] == 1.0 and torch.equal(terms["bound"], plain_terms["bound"])


@pytest.mark.parametrize("objective", ["elbo", "elbo-analytic", "iwae"])
def test_annealed_loss_weights_the_kl_by_beta(float64, objective):
    """loss = -(N/B) sum_b reduce_k(log p(x|z) + beta (log p(z) - log q(z|x))), from
    compute_log_weights with the same draws; the reported bound stays the true one."""
    model = _vae()
    beta = 0.3
    schedule = _at(make_schedule(warmup_steps=100, beta0=0.3), 0)
    obj = {"elbo": ELBO(4), "elbo-analytic": ELBO(4, analytic_kl=True), "iwae": IWAE(4)}[objective]
    loss, terms = _loss(obj.set_schedule(schedule), model)
    pyro.set_rng_seed(5)
    x, idx, n = _batch()
    lw = compute_log_weights(
        model.model, model.guide, (x, idx, n), num_particles=4, max_plate_nesting=1, analytic_kl=obj.analytic_kl
    )
    if objective == "elbo-analytic":
        annealed = lw.log_lik + beta * (lw.kl_free_log_ratio - lw.kl)
        true = lw.log_lik + lw.kl_free_log_ratio - lw.kl
    else:
        annealed, true = lw.log_lik + beta * (lw.log_prior - lw.log_q), lw.log_w
    reduce = (lambda w: torch.logsumexp(w, 0) - math.log(4)) if objective == "iwae" else (lambda w: w.mean(0))
    torch.testing.assert_close(loss, -(n / B) * reduce(annealed).sum(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(terms["bound"], reduce(true).mean(), rtol=1e-12, atol=1e-10)
    assert terms["beta"] == pytest.approx(beta)


# --- free bits -----------------------------------------------------------------------------------
def _independent_group_kls(model, per_dimension: bool, seed: int = 5) -> dict:
    """Per-group minibatch-mean MC KL, ``log q - log p`` summed per site (or per dimension),
    from the networks at the guide's draws: independent of inference.schedules."""
    pyro.set_rng_seed(seed)
    x, idx, n = _batch()
    guide = poutine.trace(model.guide)
    with pyro.plate("particles", 2, dim=-2):
        trace = poutine.trace(guide).get_trace(x, idx, n)
    normal = torch.distributions.Normal
    sites = {}
    if isinstance(model, VAE):
        z = trace.nodes["z"]["value"]
        q = model.posterior(x).base_dist
        sites["z"] = q.log_prob(z) - normal(0.0, 1.0).log_prob(z)
    else:
        h1, h2 = trace.nodes["h1"]["value"], trace.nodes["h2"]["value"]
        sites["h1"] = model.q_h1(x).base_dist.log_prob(h1) - model.p_h1(h2).base_dist.log_prob(h1)
        sites["h2"] = model.q_h2(h1).base_dist.log_prob(h2) - normal(0.0, 1.0).log_prob(h2)
    per = {name: kl.mean((0, 1)) if per_dimension else kl.sum(-1).mean((0, 1))[None] for name, kl in sites.items()}
    return per


@pytest.mark.parametrize("per", ["site", "dimension"])
@pytest.mark.parametrize("which", ["vae", "vae2"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0, 50.0])
def test_free_bits_kl_term_is_the_sum_of_floored_group_means(float64, per, which, lam):
    """The objective's KL term (loss / N - reconstruction) is sum_j max(lambda, KLbar_j):
    no group ever counts less than its floor."""
    model = _vae() if which == "vae" else _vae2()
    obj = ELBO(2).set_schedule(KLSchedule(free_bits=FreeBits(lam, per)))
    loss, terms = _loss(obj, model)
    kl_term = loss / N - terms["recon"]
    groups = _independent_group_kls(model, per == "dimension")
    floors = torch.cat([g.clamp_min(lam) for g in groups.values()])
    assert (floors >= lam).all()
    torch.testing.assert_close(kl_term, floors.sum(), rtol=1e-10, atol=1e-10)
    assert kl_term >= lam * floors.numel() - 1e-10
    for name, g in groups.items():  # the logged per-site KL is the unfloored one
        torch.testing.assert_close(terms[f"kl/{name}"], g.sum(), rtol=1e-10, atol=1e-10)


def test_free_bits_stop_the_kl_gradient_of_dimensions_below_the_floor(float64):
    """With a decoder blind to z, the encoder's gradient comes from the KL alone. Dimensions
    0 and 1 sit near the prior (KL ~ 0 < lambda): their loc and scale outputs get exactly
    zero gradient; dimensions 2 and 3 (loc 3, KL ~ 4.5 > lambda) get the KL's gradient. Without
    free bits every dimension gets one (so the test can fail)."""
    model = _vae()
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        last = model.encoder[-1]
        last.weight.mul_(0.01)
        last.bias.zero_()
        last.bias[2:L] = 3.0
        last.bias[L:] = math.log(math.e - 1)  # softplus -> scale 1 (plus min scale)

    def encoder_grad(schedule):
        model.zero_grad()
        obj = ELBO(1, analytic_kl=True).set_schedule(schedule)
        _loss(obj, model)[0].backward()
        g = last.weight.grad.abs().sum(-1) + last.bias.grad.abs()
        return g[:L], g[L:]  # per latent dimension: loc rows, scale rows

    loc, scale = encoder_grad(KLSchedule(free_bits=FreeBits(1.0, "dimension")))
    assert torch.equal(loc[:2], torch.zeros(2, dtype=loc.dtype)) and torch.equal(scale[:2], torch.zeros_like(scale[:2]))
    assert (loc[2:] > 1.0).all() and (scale[2:] > 0).all()
    loc, scale = encoder_grad(make_schedule(warmup_steps=1, beta0=0.5))  # annealing alone: all dims
    assert (loc > 0).all() and (scale > 0).all()


# --- through the runner --------------------------------------------------------------------------
def _digits_runner(schedule, run_dir=None, max_steps=None, epochs=2, log_every=1):
    data = datasets.load("digits", seed=0)
    torch.manual_seed(0)
    model = VAE(data.spec, VAE.presets["small"])
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=100,
        device="cpu",
        progress=False,
        log_every=log_every,
        max_steps=max_steps,
        checkpoint_seconds=1e9,
        validate=False,
    )
    objective = make_objective(ObjectiveConfig(name="elbo", k=1)).set_schedule(schedule)
    return Runner(model, data, objective, config=cfg, run_dir=run_dir)


def test_runner_logs_beta_and_per_site_kl_each_step(tmp_path, one_thread):
    import json

    runner = _digits_runner(make_schedule(warmup_steps=8, beta0=0.2, free_bits=0.1), tmp_path, max_steps=12)
    runner.fit()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:  # the loss of step s uses beta(s - 1): set_step runs before the step
        assert r["beta"] == pytest.approx(LinearWarmup(0.2, 8)(r["step"] - 1))
        assert r["kl/z"] == pytest.approx(r["kl"], rel=1e-5)


def test_resume_keeps_the_schedule_step_and_is_bit_exact(tmp_path, one_thread):
    """A run stopped after 7 steps (its checkpoint marked unfinished, as a killed run
    leaves it) and resumed ends with the same weights as an uninterrupted run, with the
    warm-up (20 steps) spanning the interruption."""

    def schedule():
        return make_schedule(warmup_steps=20, beta0=0.0, free_bits=0.05, free_bits_per="dimension")

    whole = _digits_runner(schedule(), tmp_path / "whole", log_every=50)
    whole.fit()
    first = _digits_runner(schedule(), tmp_path / "cut", max_steps=7, log_every=50)
    first.fit()
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["objective"]["schedule"]["step"] == 6 and state["step"] == 7
    state["done"] = False
    torch.save(state, ckpt)
    resumed = _digits_runner(schedule(), tmp_path / "cut", log_every=50)
    resumed._restore()
    assert resumed.objective.schedule.step == 6  # restored before the first resumed step
    resumed = _digits_runner(schedule(), tmp_path / "cut", log_every=50)
    resumed.fit()
    assert resumed.objective.schedule.step == whole.objective.schedule.step == 25  # 2 epochs of 13 steps
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_flags_reach_the_objective():
    from experiments.cli import _config_from_args, build_parser
    from experiments.runs import build

    args = build_parser().parse_args(
        ["train", "vae", "--data", "digits", "--kl-warmup", "30", "--kl-beta0", "0.1", "--free-bits", "0.25"]
        + ["--free-bits-per", "dimension", "--analytic-kl"]
    )
    config = _config_from_args(args)
    o = config.objective
    assert (o.kl_warmup, o.kl_beta0, o.free_bits, o.free_bits_per) == (30, 0.1, 0.25, "dimension")
    schedule = build(config)[0].objective.schedule
    assert schedule.warmup == LinearWarmup(0.1, 30) and schedule.free_bits == FreeBits(0.25, "dimension")
    plain = _config_from_args(build_parser().parse_args(["train", "vae", "--data", "digits"]))
    assert build(plain)[0].objective.schedule is None
