"""Run directories: default names show every changed setting, refusals list them, and a
finished run extended by N epochs equals the longer run bit for bit."""

import json

import pytest
import torch

from experiments.cli import default_run_dir, main
from experiments.config import RunConfig
from experiments.run_names import SUFFIX_LIMIT, run_name
from experiments.runs import train_run
from models.base import DGMError

TINY = ["--data", "digits", "--preset", "small", "--batch-size", "500", "--device", "cpu", "--no-progress"]
TINY += ["--eval-k", "3", "--eval-limit", "5"]


def test_the_default_name_shows_every_setting_that_differs_from_the_defaults():
    base = dict(model="vae", data="digits")
    assert run_name(RunConfig.from_flat(**base)) == "vae-digits-elbo-amortized-s0"
    config = RunConfig.from_flat(**base, epochs=40, lr=3e-3, options={"latent_dim": 8})
    assert run_name(config) == "vae-digits-elbo-amortized-s0-latent_dim8-epochs40-lr0.003"
    assert default_run_dir(config).name == run_name(config)
    changes = [
        dict(epochs=11),
        dict(lr=2e-3),
        dict(batch_size=50),
        dict(options={"latent_dim": 3}),
        dict(eval_k=10),
        dict(binarization="static"),
        dict(lr_schedule="step"),
        dict(grad_clip=5.0),
        dict(kl_warmup=100),
        dict(k=5),
        dict(objective="iwae"),
        dict(seed=1),
    ]
    names = {run_name(RunConfig.from_flat(**base, **change)) for change in changes}
    assert len(names) == len(changes)  # any one setting changed: another directory
    # display-only settings (device, progress) name the same run
    assert run_name(RunConfig.from_flat(**base, device="cpu", log_every=7)) == "vae-digits-elbo-amortized-s0"


def test_a_long_list_of_settings_becomes_a_stable_hash():
    config = RunConfig.from_flat(
        model="vae",
        data="digits",
        options={"encoder_hidden": (7, 7), "latent_dim": 9},
        epochs=123,
        lr=1.5e-3,
        batch_size=64,
        kl_warmup=1000,
        free_bits=0.5,
    )
    name = run_name(config)
    assert name.startswith("vae-digits-elbo-amortized-s0-cfg") and len(name.split("-cfg")[1]) == 8
    assert name == run_name(RunConfig.from_json(json.loads(json.dumps(config.to_json()))))
    assert len(name) < len("vae-digits-elbo-amortized-s0") + SUFFIX_LIMIT


def test_fully_observed_models_show_no_objective_k_or_guide():
    assert run_name(RunConfig.from_flat(model="nade", data="digits")) == "nade-digits-s0"
    assert run_name(RunConfig.from_flat(model="nade", data="digits", k=5, guide="local")) == "nade-digits-s0"
    assert run_name(RunConfig.from_flat(model="made", data="digits", epochs=3)) == "made-digits-s0-epochs3"


def test_the_refusal_lists_the_settings_that_differ(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    config = RunConfig.from_json(json.loads((run / "config.json").read_text()))
    changed = config.changed({"lr": 3e-3, "epochs": 4})
    with pytest.raises(DGMError, match=r"--epochs 1 -> 4; --lr 0.001 -> 0.003"):
        train_run(changed, run)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_more_epochs_extends_a_finished_run_bit_for_bit(tmp_path, capsys):
    short, whole = tmp_path / "short", tmp_path / "whole"
    assert (
        main(
            [
                "train",
                "vae",
                *TINY,
                "--epochs",
                "2",
                "--lr-schedule",
                "step",
                "--lr-step-every",
                "1",
                "--run-dir",
                str(short),
            ]
        )
        == 0
    )
    assert main(["train", str(short), "--more-epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote: " in out and str(short / "summary.json") in out and str(short / "curves.png") in out
    assert (
        main(
            [
                "train",
                "vae",
                *TINY,
                "--epochs",
                "3",
                "--lr-schedule",
                "step",
                "--lr-step-every",
                "1",
                "--run-dir",
                str(whole),
            ]
        )
        == 0
    )
    for name in ("checkpoint.pt", "final.pt", "best.pt"):
        a, b = _weights(short / name), _weights(whole / name)
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
    a, b = _weights(short / "checkpoint.pt"), _weights(whole / "checkpoint.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3 and a["done"] and b["done"]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (short, whole))
    assert sa["test"]["nll"] == sb["test"]["nll"] and sa["epochs"] == 3
    assert json.loads((short / "config.json").read_text())["train"]["epochs"] == 3
    metrics = lambda d: (d / "metrics.jsonl").read_text()  # noqa: E731
    assert metrics(short) == metrics(whole)


def test_more_epochs_refuses_schedules_that_span_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "1", "--lr-schedule", "cosine", "--run-dir", str(run)]) == 0
    assert main(["train", str(run), "--more-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "cosine" in err and "--epochs 3" in err
