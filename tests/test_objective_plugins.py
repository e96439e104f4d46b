"""Every objective of issue 13 through the two front doors: ``pyro.infer.SVI`` and the runner."""

import math

import pyro
import pyro.optim
import pytest
import torch

from experiments import data as datasets
from inference.config import ObjectiveConfig
from inference.objective import make_objective
from inference.runner import Runner, TrainConfig
from models.base import DataSpec
from models.latent.sbn import SBN, SBNConfig
from models.latent.vae import VAE, VAEConfig

REPARAMETERIZED = ["renyi", "vimco", "stl", "dreg", "rws"]
DISCRETE = ["renyi", "vimco", "rws"]


def _vae(d=12):
    return VAE(DataSpec((d,), "binary"), VAEConfig(latent_dim=3, encoder_hidden=(7,), decoder_hidden=(7,)))


def _sbn(d=12):
    return SBN(DataSpec((d,), "binary"), SBNConfig(layers=(4,), init_scale=0.3))


@pytest.mark.parametrize(
    "name,build",
    [(n, _vae) for n in REPARAMETERIZED] + [(n, _sbn) for n in DISCRETE],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_one_svi_step_moves_every_trained_parameter(name, build):
    torch.manual_seed(0)
    m = build()
    x = torch.bernoulli(torch.full((6, 12), 0.4))
    objective = make_objective(ObjectiveConfig(name=name, k=3))
    objective.check(m)
    pm, pg = m.svi_pair()
    svi = pyro.infer.SVI(pm, pg, pyro.optim.Adam({"lr": 1e-2}), objective)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    loss = svi.step(x)
    assert math.isfinite(loss)
    moved = {k for k, v in m.named_parameters() if not torch.equal(before[k], v.detach())}
    assert moved == set(before), set(before) - moved
    with torch.no_grad():  # the bound of an SVI step is the objective's own per-datapoint bound
        bound = objective.bound(m.model, m.guide, x)
    assert bound.shape == (6,) and torch.isfinite(bound).all()


@pytest.mark.parametrize("name", REPARAMETERIZED)
def test_runner_trains_and_validates_with_each_objective(name, one_thread):
    data = datasets.load("digits")
    model = (_sbn if name in ("rws",) else _vae)(data.spec.dim)
    config = TrainConfig(epochs=1, max_steps=3, batch_size=20, device="cpu", progress=False)
    runner = Runner(model, data, make_objective(ObjectiveConfig(name=name, k=3)), config=config)
    runner.fit()
    val = runner.objective.validation_bound(model, runner.guide, data.val[:10])
    assert val.shape == (10,) and torch.isfinite(val).all() and (val < 0).all()
