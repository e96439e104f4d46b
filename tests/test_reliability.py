"""Fault injection: what a run directory, a bad command or a diverging run can do to the
suite, and what it must do instead (one-line errors, no code execution, rollbacks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.config import RunConfig
from experiments.runs import load_run, train_run
from inference.runner import MetricsLog, Runner, load_state, run_lock
from models.base import DGMError

TINY = dict(model="vae", preset="small", data="digits", epochs=1, max_steps=4, device="cpu", progress=False)
TINY.update(eval_k=4, eval_limit=8, checkpoint_seconds=0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "vae"
    train_run(RunConfig.from_flat(**TINY), run)
    return run


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["final.pt", "checkpoint.pt", "best.pt"])
def test_a_malicious_checkpoint_runs_nothing(finished_run, tmp_path, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, run / name)
    with pytest.raises(DGMError, match=name):
        load_state(run / name)
    if name == "checkpoint.pt":  # without final.pt, load_run reads the checkpoint first
        (run / "final.pt").unlink()
    with pytest.raises(DGMError, match="damaged or is not a pyro-dgm checkpoint"):
        if name == "best.pt":
            (run / "final.pt").unlink()
            torch.save({"model": {}, "done": True}, run / "checkpoint.pt")  # a finished run of an older version
        load_run(run)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()[:64]) + p.read_bytes()[64:]),
    ],
    ids=["empty", "truncated", "bit-flipped"],
)
def test_damaged_weights_give_one_line_errors_naming_the_file(finished_run, tmp_path, damage, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "final.pt")
    for command in (["eval", str(run), "--k", "2", "--limit", "2"], ["sample", str(run), "--n", "4"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dgm: error:") and "final.pt" in err and "\n" not in err


def test_weights_of_another_model_are_refused(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["options"] = {"latent_dim": 3}
    (run / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(run), "--k", "2"]) == 2
    assert "another model" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{", "[]", '{"model": {"name": "vae", "bogus": 1}}'])
def test_a_broken_config_is_refused_in_one_line(finished_run, tmp_path, capsys, text):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "config.json").write_text(text)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and err.count("\n") == 1


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 1.0})
    log.write({"step": 2, "loss": 2.0})
    with open(log.path, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-append
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]


def test_a_second_trainer_in_the_same_directory_is_refused(tmp_path):
    with run_lock(tmp_path):
        with run_lock(tmp_path):  # the same process may re-enter
            pass
        code = f"from inference.runner import run_lock\nwith run_lock({str(tmp_path)!r}): pass\n"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode != 0 and "another process is training" in done.stderr
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--eval-k", "0"],
        ["--k", "0"],
        ["--epochs", "-1"],
        ["--batch-size", "0"],
        ["--batch-size", "-10"],
        ["--lr", "nan"],
        ["--lr", "-0.001"],
        ["--lr", "inf"],
        ["--max-steps", "-1"],
        ["--patience", "-1"],
        ["--checkpoint-seconds", "nan"],
        ["--eval-limit", "-5"],
        ["--opt", "latent_dim=abc"],
        ["--opt", "no_such_option=1"],
        ["--device", "cuda:1"],
        ["--preset", "no-such-preset"],
        ["--objective", "em"],
    ],
)
def test_refused_commands_leave_no_run_directory(tmp_path, capsys, flags):
    run = tmp_path / "run"
    code = main(["train", "vae", "--data", "digits", "--preset", "small", "--run-dir", str(run), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dgm: error:") and "\n" not in err
    assert not run.exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for run in (blocker, blocker / "under"):
        assert main(["train", "vae", "--data", "digits", "--preset", "small", "--run-dir", str(run)]) == 2
        assert "cannot create the run directory" in capsys.readouterr().err


def test_divergence_rolls_back_with_a_lower_learning_rate_then_stops(tmp_path):
    config = RunConfig.from_flat(**{**TINY, "max_steps": None, "epochs": 3, "lr": 1000.0, "log_every": 5})
    with pytest.raises(DGMError, match="diverged .* after 3 rollbacks"):
        train_run(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r["split"] == "rollback"]
    assert [r["lr"] for r in rollbacks] == pytest.approx([100.0, 10.0, 1.0])
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_recovering_run_keeps_its_lowered_learning_rate(tmp_path):
    """One divergence (a planted NaN step), then training goes on at lr x 0.1 and finishes."""
    from experiments.runs import build

    config = RunConfig.from_flat(**{**TINY, "max_steps": 12, "log_every": 2})
    runner, _ = build(config, tmp_path / "run")
    step = runner.objective.train_step
    calls = {"n": 0}

    def poisoned(model, *args):
        calls["n"] += 1
        terms = step(model, *args)
        if calls["n"] == 5:  # the step after the first log: poison every parameter
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return terms

    runner.objective.train_step = poisoned
    progress = runner.fit()
    assert progress["step"] == 12 and progress["rollbacks"] == 1
    assert runner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(torch.isfinite(p).all() for p in runner.model.parameters())
    assert isinstance(runner, Runner)


KILL_DURING_SAVE = """
import io, os, signal, sys, torch
calls = {"n": 0}
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[1]):  # write half of this checkpoint, then die mid-write
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from experiments.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_kill_during_the_checkpoint_write_resumes_bit_for_bit(tmp_path):
    root = Path(__file__).resolve().parents[1]
    args = ["train", "vae", "--data", "digits", "--preset", "small", "--epochs", "2", "--device", "cpu"]
    args += ["--checkpoint-seconds", "0", "--no-progress", "--eval-k", "3", "--eval-limit", "5"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(args + ["--run-dir", str(whole)]) == 0
    died = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, "6", *args, "--run-dir", str(killed)], cwd=root, capture_output=True
    )
    assert died.returncode == -9
    assert (killed / "checkpoint.pt.tmp").exists() and not load_state(killed / "checkpoint.pt")["done"]
    resumed = subprocess.run([sys.executable, "-m", "experiments.cli", *args, "--run-dir", str(killed)], cwd=root)
    assert resumed.returncode == 0
    a, b = (load_state(d / "final.pt")["model"] for d in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "{run}", "--n", "0"],
        ["sample", "{run}", "--n", "-3"],
        ["sample", "{run}", "--out", "/proc/no/such/dir/x.png"],
        ["eval", "{run}", "--limit", "0"],
        ["eval", "{run}", "--k", "0"],
        ["eval", "{run}", "--limit", "-5"],
        ["score", "{run}", "--out", "/proc/no/such/dir/x.csv", "--limit", "2", "--k", "2"],
        ["eval", "{run}/no-such-run"],
    ],
)
def test_bad_arguments_to_finished_runs_are_one_line_errors(finished_run, capsys, command):
    code = main([part.replace("{run}", str(finished_run)) for part in command])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dgm: error:") and "\n" not in err, err


def test_a_huge_k_is_refused_before_allocating_with_what_fits(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--objective", "iwae", "--k", "100000000", "--run-dir", str(run)]
    assert main(["train", "vae", "--data", "digits", "--preset", "small", *flags]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "use --k" in err and not run.exists()


def test_python_api_errors_are_dgm_errors_and_value_errors():
    from experiments import data as datasets
    from inference import IWAE, estimate_dataset
    from models.base import DataSpec
    from models.latent.vae import VAE, VAEConfig

    with pytest.raises(ValueError):
        IWAE(0)
    with pytest.raises(DGMError):
        IWAE(0)
    with pytest.raises(DGMError, match="positive integers"):
        DataSpec((-4,), "binary")
    m = VAE(DataSpec((4,), "binary"), VAEConfig(latent_dim=1, encoder_hidden=(3,), decoder_hidden=(3,)))
    for bad, match in [
        (torch.zeros(2, 4, dtype=torch.float64), "float64 but"),
        ([[0.0, 1.0, 0.0, 1.0]], "torch.Tensor"),
        (torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), "NaN"),
    ]:
        with pytest.raises(DGMError, match=match):
            estimate_dataset(m, bad, method="is", num_samples=2, progress=False)
    assert datasets.load("digits").train.dtype == torch.float32
    for n in (-1, 0, 2.5):
        with pytest.raises(DGMError, match="positive integer"):
            m.sample(n)


def test_sequence_models_sample_in_their_own_dtype():
    from models.autoregressive.charrnn import CharRNN
    from models.base import DataSpec

    model = CharRNN(DataSpec((6,), "categorical", num_levels=4), CharRNN.presets["small"]).double()
    x = model.sample(3)
    assert x.dtype == torch.float64 and x.shape == (3, 6)
    with pytest.raises(DGMError, match="positive integer"):
        model.sample(0)


def test_a_damaged_checkpoint_or_summary_is_named_by_train_and_compare(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("final.pt", "summary.json"):
        (run / name).unlink()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    flags = ["--data", "digits", "--preset", "small", "--epochs", "1", "--max-steps", "4", "--device", "cpu"]
    flags += ["--eval-k", "4", "--eval-limit", "8", "--checkpoint-seconds", "0", "--no-progress"]
    assert main(["train", "vae", *flags, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.pt" in err and "delete it" in err and "\n" not in err
    shutil.copytree(finished_run, tmp_path / "other")
    (tmp_path / "other" / "summary.json").write_text("{")
    assert main(["compare", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert "summary.json" in err and "\n" not in err


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--opt", "encoder_hidden=(100000,100000)", "--run-dir", str(run)]
    assert main(["train", "vae", "--data", "digits", *flags]) == 2
    err = capsys.readouterr().err
    assert "parameters" in err and "GiB free" in err and not run.exists()


def test_the_size_probe_leaves_the_random_state_alone():
    """A model that draws CPU random numbers when built (an ordering, say) gets the same
    draws whether or not the memory probe built it first."""
    from experiments.config import ModelConfig
    from experiments.runs import _check_model_size
    from models.base import DataSpec, GenerativeModel

    class _Ordered(GenerativeModel):
        def __init__(self, spec, config=None):
            super().__init__(spec)
            self.register_buffer("order", torch.randperm(spec.dim, device="cpu"))

    spec = DataSpec((16,), "binary")
    torch.manual_seed(3)
    _check_model_size(_Ordered, spec, None, ModelConfig("ordered"))
    probed = _Ordered(spec).order
    torch.manual_seed(3)
    assert torch.equal(probed, _Ordered(spec).order)
