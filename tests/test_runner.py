"""The runner: exact resume after SIGKILL, data checks, experiments."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from experiments import data as datasets
from inference.objectives import ELBO
from inference.runner import Runner, TrainConfig
from models.base import DataError, DataSpec
from models.latent.vae import VAE, VAEConfig
from tests.helpers import CLI, ROOT, TINY_EVAL, run_cli

TRAIN = (
    CLI
    + [
        "train",
        "vae",
        "--data",
        "digits",
        "--preset",
        "small",
        "--epochs",
        "3",
        "--batch-size",
        "100",
        "--checkpoint-seconds",
        "0",
    ]
    + TINY_EVAL
)


def _checkpoint_step(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None


def test_sigkill_mid_epoch_then_resume_gives_identical_parameters(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli(TRAIN + ["--run-dir", str(whole)]).returncode == 0
    proc = subprocess.Popen(
        TRAIN + ["--run-dir", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = killed / "checkpoint.pt"
    state = None
    deadline = time.time() + 240
    while time.time() < deadline:
        state = _checkpoint_step(ckpt) if ckpt.exists() else None
        if state is not None and state["step"] >= 16 and state["batch"] != 0:  # inside epoch 2
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = _checkpoint_step(ckpt)
    assert state is not None and not state["done"], "the run finished before it could be killed"
    resumed = run_cli(TRAIN + ["--run-dir", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["step"] == b["step"] and b["done"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = [
        json.loads(line)["step"]
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == sorted(set(steps)), "metrics lines were duplicated by the resume"
    for name in ("config.json", "summary.json", "samples.png", "best.pt"):
        assert (killed / name).exists(), name


class _Data:
    dynamic = False

    def __init__(self, train, val=None, test=None):
        self.train, self.val, self.test = train, val, test

    def train_epoch(self, generator):
        return self.train


def test_runner_rejects_bad_data_before_training():
    m = VAE(DataSpec((4,), "binary"), VAEConfig(latent_dim=1, encoder_hidden=(3,), decoder_hidden=(3,)))
    bad = torch.tensor([[0.0, 1.0, float("nan"), 1.0]])
    with pytest.raises(DataError, match="NaN"):
        Runner(m, _Data(bad), ELBO())
    with pytest.raises(DataError, match="Bernoulli"):
        Runner(m, _Data(torch.full((2, 4), 0.5)), ELBO())
    with pytest.raises(DataError, match="shape"):
        Runner(m, _Data(torch.zeros(2, 5)), ELBO())


def test_reproduce_quickstart_tiny(tmp_path):
    out = run_cli(CLI + ["reproduce", "quickstart", "--tiny", "--out", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    assert table.count("| vae-") == 2 and "is K=10" in table
    for run in ("vae-elbo", "vae-iwae5"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert 0 < summary["test"]["nll"] < 784 * 0.7  # finite, and below a coin-flip model's 543 nats
    run = tmp_path / "vae-elbo"
    out = run_cli(CLI + ["eval", str(run), "--estimator", "naive", "--k", "50", "--limit", "5"])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["estimator"] == "naive" and result["n"] == 5 and (run / "eval_naive_K50_test_n5.json").exists()
    assert run_cli(CLI + ["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]).returncode == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    out = run_cli(CLI + ["compare", str(run), str(tmp_path / "vae-iwae5")])
    assert out.returncode == 0 and out.stdout.count("| vae-") == 2
    out = run_cli(CLI + ["eval", str(run), "--estimator", "exact"])
    assert out.returncode == 2 and "no exact log p(x)" in out.stderr


def test_svi_through_the_runner_reaches_the_ppca_mle():
    """Training PPCA's Pyro program with the ELBO and its linear encoder (which contains the
    exact posterior) must reach the closed-form maximum likelihood (Tipping & Bishop 1999)."""
    from models.latent.ppca import PPCA, PPCAConfig

    data = datasets.load("ppca")
    torch.manual_seed(0)
    m = PPCA(data.spec, PPCAConfig(latent_dim=3))
    Runner(m, data, ELBO(), config=TrainConfig(epochs=30, lr=1e-2, progress=False, validate=False)).fit()
    w, mu, s2 = PPCA.mle(data.train, 3)
    mle = PPCA(data.spec, PPCAConfig(latent_dim=3))
    mle.set_params(w, mu, s2)
    with torch.no_grad():
        gap = (mle.log_prob(data.train).mean() - m.log_prob(data.train).mean()).item()
    assert 0 <= gap < 0.05, gap  # the MLE is the maximum; SVI gets within 0.05 nats per point
    assert m.log_sigma.exp().item() ** 2 == pytest.approx(float(s2), rel=0.05)


def test_fit_ends_on_the_best_validation_weights_without_a_run_directory():
    """NADE on 17-level digits overfits at lr 1e-2 (its validation bound is exact, so the
    check is deterministic): after fit the model must hold the best epoch's weights."""
    from models.autoregressive.nade import NADE, NADEConfig

    data = datasets.load("digits17")
    torch.manual_seed(0)
    m = NADE(data.spec, NADEConfig(hidden=64))
    progress = Runner(m, data, ELBO(), config=TrainConfig(epochs=25, lr=1e-2, progress=False)).fit()
    with torch.no_grad():
        final = m.log_prob(data.val).mean().item()
    assert final == pytest.approx(progress["best_val"], abs=1e-4)
