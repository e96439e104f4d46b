"""Learning-rate schedules and gradient clipping: the rates against their formulas, the
runner taking them step by step, clipping bounding the global norm, and an interrupted run
with a schedule resuming bit for bit."""

import json
import math
from dataclasses import replace

import pytest
import torch

from inference.config import ConfigError, TrainConfig
from inference.lr_schedules import burda_epochs, extendable, fixed_epochs, learning_rate
from inference.objectives import ELBO
from inference.runner import Runner
from models.base import DataSpec
from models.latent.vae import VAE, VAEConfig


class _Data:
    name = "synthetic bits"
    dynamic = False

    def __init__(self, n: int = 60, d: int = 6):
        g = torch.Generator().manual_seed(3)
        self.train = torch.bernoulli(torch.full((n, d), 0.3), generator=g)
        self.val = torch.bernoulli(torch.full((20, d), 0.3), generator=g)
        self.test = self.val

    def train_epoch(self, generator):
        return self.train


def _model(d: int = 6):
    torch.manual_seed(0)  # the same initial weights for every run of a test
    return VAE(DataSpec((d,), "binary"), VAEConfig(latent_dim=2, encoder_hidden=(5,), decoder_hidden=(5,)))


def _config(**kw):
    base = dict(epochs=3, batch_size=20, lr=1e-2, device="cpu", progress=False, log_every=1, checkpoint_seconds=0)
    return TrainConfig(**{**base, **kw})


# --- the formulas -------------------------------------------------------------------------------
def test_burda_schedule_is_3_to_the_i_epochs_at_lr_times_10_to_the_minus_i_over_7():
    cfg = TrainConfig(epochs=3280, lr=1e-3, lr_schedule="burda")
    assert burda_epochs(8) == 3280 == fixed_epochs(cfg)
    stages = [i for i in range(8) for _ in range(3**i)]  # the paper's schedule, written out
    assert len(stages) == 3280
    spe = 7  # steps per epoch: every step of an epoch takes its epoch's rate
    for epoch, i in enumerate(stages):
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert learning_rate(cfg, step, spe) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
    assert learning_rate(cfg, 0, spe) == 1e-3
    assert learning_rate(cfg, 3279 * spe, spe) == pytest.approx(1e-4, rel=1e-12)  # the last stage: lr / 10
    assert learning_rate(cfg, 4 * spe, spe) < learning_rate(cfg, 4 * spe - 1, spe)  # stage 2 starts at epoch 4


def test_cosine_schedule_goes_from_lr_to_lr_min_over_the_run():
    cfg = TrainConfig(epochs=4, lr=1e-2, lr_schedule="cosine", lr_min=1e-4)
    spe, total = 25, 100
    assert learning_rate(cfg, 0, spe) == pytest.approx(1e-2)
    assert learning_rate(cfg, total // 2, spe) == pytest.approx((1e-2 + 1e-4) / 2)
    assert learning_rate(cfg, total, spe) == pytest.approx(1e-4)
    for t in (1, 13, 37, 99):
        expected = 1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * t / total)) / 2
        assert learning_rate(cfg, t, spe) == pytest.approx(expected, rel=1e-12)


def test_step_schedule_multiplies_by_the_factor_every_n_epochs():
    cfg = TrainConfig(epochs=20, lr=0.1, lr_schedule="step", lr_step_every=3, lr_step_factor=0.5)
    for epoch in range(20):
        assert learning_rate(cfg, epoch * 10 + 9, 10) == pytest.approx(0.1 * 0.5 ** (epoch // 3), rel=1e-12)
    assert learning_rate(replace(cfg, lr_schedule="constant"), 12345, 10) == 0.1


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="--epochs 3280"):
        TrainConfig(epochs=10, lr_schedule="burda").check()
    TrainConfig(epochs=13, lr_schedule="burda", lr_burda_stages=3).check()  # 1 + 3 + 9 epochs
    with pytest.raises(ConfigError, match="--lr-min"):
        TrainConfig(lr=1e-3, lr_min=1e-2, lr_schedule="cosine").check()
    with pytest.raises(ConfigError, match="--grad-clip"):
        TrainConfig(grad_clip=-1.0).check()
    with pytest.raises(ConfigError, match="--lr-step-factor"):
        TrainConfig(lr_step_factor=2.0).check()
    assert extendable(TrainConfig(lr_schedule="step")) and not extendable(TrainConfig(lr_schedule="cosine"))


# --- the runner ---------------------------------------------------------------------------------
def _record_steps(runner, log):
    """Record, at every optimizer step after the runner's own hooks, the rate and the
    gradients' global norm (and the gradients themselves)."""

    def hook(optimizer, args, kwargs):
        grads = [p.grad.detach().clone() for p in runner.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        log.append({"lr": optimizer.param_groups[0]["lr"], "norm": norm, "grads": grads})

    runner.optimizer.register_step_pre_hook(hook)


def test_the_runner_steps_with_the_schedules_rates():
    cfg = _config(epochs=3, lr_schedule="cosine", lr_min=1e-3)
    runner = Runner(_model(), _Data(), ELBO(), config=cfg)
    log = []
    _record_steps(runner, log)
    runner.fit()
    assert len(log) == 9  # 3 epochs x 60 / 20
    for step, entry in enumerate(log):
        assert entry["lr"] == learning_rate(cfg, step, 3)
    assert log[0]["lr"] == pytest.approx(1e-2) and log[-1]["lr"] == pytest.approx(
        1e-3 + 9e-3 * (1 + math.cos(8 * math.pi / 9)) / 2
    )


def test_grad_clip_bounds_the_global_norm_and_keeps_the_direction():
    data = _Data()
    free, clipped = [], []
    runner = Runner(_model(), data, ELBO(), config=_config(epochs=1))
    _record_steps(runner, free)
    runner.fit()
    c = 0.5 * min(entry["norm"] for entry in free)  # below every unclipped norm: every step is clipped
    runner = Runner(_model(), data, ELBO(), config=_config(epochs=1, grad_clip=c))
    _record_steps(runner, clipped)
    runner.fit()
    assert all(entry["norm"] <= c * (1 + 1e-5) for entry in clipped)
    assert clipped[0]["norm"] == pytest.approx(c, rel=1e-5)
    # the first step has the same parameters, so its clipped gradient is the free one times c / norm
    scale = c / free[0]["norm"]
    for g_free, g_clipped in zip(free[0]["grads"], clipped[0]["grads"]):
        torch.testing.assert_close(g_clipped, g_free * scale, rtol=1e-5, atol=1e-7)
    TrainConfig(grad_clip=0.0).check()  # 0: off
    runner = Runner(_model(), data, ELBO(), config=_config(epochs=1, grad_clip=0.0))
    assert not runner.optimizer._optimizer_step_pre_hooks


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "schedule", [dict(lr_schedule="cosine", lr_min=1e-4), dict(lr_schedule="step", lr_step_every=1)]
)
@pytest.mark.filterwarnings("ignore:.*no config.json:models.base.DGMWarning")
def test_a_run_with_a_schedule_interrupted_mid_epoch_resumes_bit_for_bit(tmp_path, schedule):
    data = _Data()
    cfg = _config(epochs=3, grad_clip=1.0, **schedule)
    whole = Runner(_model(), data, ELBO(), config=cfg, run_dir=tmp_path / "whole")
    whole.fit()

    killed = Runner(_model(), data, ELBO(), config=cfg, run_dir=tmp_path / "killed")
    calls = []

    def kill(optimizer, args, kwargs):  # "killed" before the 5th step (inside epoch 2)
        calls.append(1)
        if len(calls) == 5:
            raise _Stop

    killed.optimizer.register_step_pre_hook(kill)
    with pytest.raises(_Stop):
        killed.fit()
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["batch"] == 1 and not state["done"]
    resumed = Runner(_model(), data, ELBO(), config=cfg, run_dir=tmp_path / "killed")
    resumed.fit()
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]

    def rates(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["lr"]) for r in lines if r["split"] == "train"]

    assert rates("whole") == rates("killed") == [(s + 1, learning_rate(cfg, s, 3)) for s in range(9)]


# --- the paper protocol ---------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["mnist-iwae", "mnist-vae2"])
def test_the_paper_protocol_is_burda_et_al_s(experiment):
    from experiments.reproduce import EXPERIMENTS, _tiny

    runs = EXPERIMENTS[experiment].paper
    assert sorted((c.objective.name, c.objective.k) for _, c in runs) == sorted(
        [("elbo", 1), ("elbo", 5), ("elbo", 50), ("iwae", 5), ("iwae", 50)]  # Table 1: VAE and IWAE, K = 1, 5, 50
    )
    for _, config in runs:
        t = config.train
        assert (t.batch_size, t.lr, t.adam_eps, t.lr_schedule, t.epochs) == (20, 1e-3, 1e-4, "burda", 3280)
        assert config.eval.k == 5000 and config.eval.limit is None  # all 10,000 test images
        assert config.data.name == "mnist" and config.data.binarization == "dynamic"
        config.check()
        assert _tiny(t)["epochs"] == 3280 and _tiny(t)["max_steps"] == 3  # --tiny keeps the schedule's length
    assert EXPERIMENTS["quickstart"].paper is None


def test_an_experiment_without_a_paper_protocol_refuses_it(tmp_path):
    from experiments.reproduce import reproduce
    from models.base import DGMError

    with pytest.raises(DGMError, match="no paper protocol; experiments with one: mnist-iwae, mnist-vae2"):
        reproduce("quickstart", out=tmp_path, protocol="paper")
