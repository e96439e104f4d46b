"""A user's own model class: ``dgm train path/to/file.py:ClassName``, models of installed
packages (entry-point group ``pyro_dgm.models``), and ``Runner(..., run_dir=...)`` writing a
run directory that every ``dgm`` command reads (``models.loading``, ``inference.rundir``)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import textwrap

import pytest
import torch

from experiments.cli import main
from experiments.data import load
from experiments.runs import load_run
from inference import EvalConfig, ObjectiveConfig, Runner, TrainConfig
from models.base import DGMError, DGMWarning, GenerativeModel
from models.loading import import_model_file, model_reference, resolve_model
from tests.helpers import CLI, ROOT, run_cli

MODEL_FILE = textwrap.dedent(
    '''
    """Two models of a user's own."""
    from dataclasses import dataclass

    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn

    from models.base import GenerativeModel


    @dataclass
    class CoinsConfig:
        init_logit: float = 0.0


    class Coins(GenerativeModel):
        """Independent Bernoulli pixels: log p(x) = sum_d x_d log s(t_d) + (1 - x_d) log s(-t_d)."""

        has_exact_log_prob = True
        config_class = CoinsConfig

        def __init__(self, spec, config=None):
            super().__init__(spec)
            self.config = config or CoinsConfig()
            self.logits = nn.Parameter(torch.full((spec.dim,), float(self.config.init_logit)))

        def model(self, x, idx=None, size=None):
            with self.data_plate(x, idx, size):
                pyro.sample("x", dist.Bernoulli(logits=self.logits.expand_as(x)).to_event(1), obs=x)

        def log_prob(self, x):
            return dist.Bernoulli(logits=self.logits).to_event(1).log_prob(x)

        def sample(self, n):
            return torch.bernoulli(torch.sigmoid(self.logits).expand(n, -1))


    class TinyVAE(GenerativeModel):
        """z ~ N(0, I_2), x | z ~ Bernoulli(decoder(z)); built as TinyVAE(spec)."""

        def __init__(self, spec):
            super().__init__(spec)
            self.decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, spec.dim))
            self.encoder = nn.Sequential(nn.Linear(spec.dim, 16), nn.Tanh(), nn.Linear(16, 4))

        def model(self, x, idx=None, size=None):
            with self.data_plate(x, idx, size):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

        def guide(self, x, idx=None, size=None):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            with self.data_plate(x, idx, size):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

        def sample(self, n):
            z = torch.randn(n, 2)
            return torch.bernoulli(torch.sigmoid(self.decoder(z)))


    class Sampleless(TinyVAE):
        """The README tour's model: no sample(n) of its own."""

        sample = GenerativeModel.sample


    NOT_A_MODEL = 3
    '''
)

TINY = ["--data", "digits", "--epochs", "1", "--max-steps", "3", "--device", "cpu", "--no-progress"]
TINY += ["--eval-k", "3", "--eval-limit", "5"]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(MODEL_FILE)
    return path


def _exact_log_px(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Independent Bernoulli pixels, by hand."""
    logits = logits.double()
    return (
        x.double() * torch.nn.functional.logsigmoid(logits) + (1 - x.double()) * torch.nn.functional.logsigmoid(-logits)
    ).sum(-1)


def test_a_file_model_trains_and_every_command_reads_its_run(tmp_path, model_file, capsys):
    run = tmp_path / "run"
    assert main(["train", f"{model_file}:Coins", *TINY, "--opt", "init_logit=0.5", "--run-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == f"{model_file.resolve()}:Coins"
    assert config["model"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert config["model"]["options"] == {"init_logit": 0.5}
    logits = torch.load(run / "final.pt", weights_only=True)["model"]["logits"]
    x_test = load("digits").test
    exact = _exact_log_px(logits, x_test)

    # a fresh process imports the file again and evaluates exactly what was trained
    done = run_cli(CLI + ["eval", str(run), "--estimator", "exact"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n"] == len(x_test)
    torch.testing.assert_close(result["nll"], -exact.mean().item())

    capsys.readouterr()
    assert main(["score", str(run), "--out", str(tmp_path / "s.csv")]) == 0
    with open(tmp_path / "s.csv") as f:
        scored = torch.tensor([float(row["log_px"]) for row in csv.DictReader(f)], dtype=torch.float64)
    torch.testing.assert_close(scored, exact, atol=1e-5, rtol=0)
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["compare", str(run)]) == 0
    assert "| run | Coins |" in capsys.readouterr().out


def test_a_file_model_without_a_config_class_and_the_latent_command(tmp_path, model_file, capsys):
    run = tmp_path / "vae"
    assert main(["train", f"{model_file}:TinyVAE", *TINY, "--run-dir", str(run)]) == 0
    weights = torch.load(run / "final.pt", weights_only=True)["model"]
    loaded = load_run(run).model
    assert (
        type(loaded).__name__ == "TinyVAE" and json.loads((run / "config.json").read_text())["model"]["options"] == {}
    )
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, weights[name])
    assert main(["latent", str(run), "--what", "reconstruct", "--images", "3", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").exists()
    assert main(["train", f"{model_file}:TinyVAE", *TINY, "--opt", "width=3", "--run-dir", str(tmp_path / "x")]) == 2
    assert "takes no options or presets" in capsys.readouterr().err


def test_a_model_without_sample_trains_evaluates_and_says_why_it_has_no_samples(tmp_path, model_file, capsys):
    run = tmp_path / "run"
    with pytest.warns(DGMWarning, match="no samples.png: Sampleless does not implement sample"):
        assert main(["train", f"{model_file}:Sampleless", *TINY, "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["nll"] > 0 and not (run / "samples.png").exists()
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dgm: error: Sampleless does not implement sample(n)") and "\n" not in err


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("absent.py:Coins", "absent.py does not exist"),
        ("{file}:Missing", "defines no class 'Missing'; classes defined there: CoinsConfig, Coins, TinyVAE"),
        ("{file}:NOT_A_MODEL", "is not a GenerativeModel subclass"),
        ("{file}:CoinsConfig", "is not a GenerativeModel subclass"),
        ("{broken}:Anything", "importing the model file"),
        ("no-such-model", "unknown model 'no-such-model'"),
    ],
)
def test_a_bad_model_reference_is_refused_in_one_line(tmp_path, model_file, capsys, ref, expected):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    ref = ref.format(file=model_file, broken=broken)
    with pytest.raises(DGMError, match=None) as err:
        resolve_model(ref)
    assert expected in str(err.value) and "\n" not in str(err.value)
    run = tmp_path / "run"
    assert main(["train", ref, *TINY, "--run-dir", str(run)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not run.exists()


def test_a_changed_model_file_is_imported_afresh_and_its_run_warns(tmp_path, model_file):
    run = tmp_path / "run"
    assert main(["train", f"{model_file}:Coins", *TINY, "--run-dir", str(run)]) == 0
    first = resolve_model(f"{model_file}:Coins")
    model_file.write_text(MODEL_FILE + "\nEDITED = True\n")
    assert resolve_model(f"{model_file}:Coins") is not first  # the new content, not a stale module
    with pytest.warns(DGMWarning, match="my_models.py changed since"):
        load_run(run)
    with pytest.warns(DGMWarning, match="my_models.py changed since"):  # and so does resuming it
        assert main(["train", f"{model_file}:Coins", *TINY, "--run-dir", str(run)]) == 0


def test_an_installed_package_adds_its_models_through_entry_points(tmp_path):
    package = tmp_path / "dgm_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(MODEL_FILE)
    info = tmp_path / "dgm_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dgm-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[pyro_dgm.models]\ncoins = dgm_plugin:Coins\nbroken = dgm_plugin:NOT_A_MODEL\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    script = textwrap.dedent(
        f"""
        from experiments.cli import main
        main(["list"])
        print("train:", main(["train", "coins", *{TINY!r}, "--run-dir", {str(tmp_path / "run")!r}]))
        print("broken:", main(["train", "broken", *{TINY!r}, "--run-dir", {str(tmp_path / "b")!r}]))
        """
    )
    done = run_cli([sys.executable, "-c", script], env=env)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert "coins" in listed and "broken" not in listed
    assert "train: 0" in done.stdout and "broken: 2" in done.stdout
    assert "model 'broken' (entry point in pyro_dgm.models) cannot be loaded" in done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["name"] == "coins"


# --- Runner(..., run_dir=...) -------------------------------------------------------------------
def test_a_python_run_directory_is_read_by_dgm_eval_sample_and_compare(tmp_path, model_file, capsys):
    Coins = import_model_file(model_file, "Coins")
    data = load("digits")
    run = tmp_path / "py-run"
    config = TrainConfig(epochs=1, max_steps=4, device="cpu", progress=False)
    runner = Runner(Coins(data.spec), data, ObjectiveConfig(name="elbo"), config=config, run_dir=run)
    runner.fit()
    config_json = json.loads((run / "config.json").read_text())
    assert config_json["model"]["name"] == f"{model_file.resolve()}:Coins"
    assert config_json["data"]["name"] == "digits" and config_json["objective"]["name"] == "elbo"
    own = runner.evaluate(estimator="exact")["nll"]

    done = run_cli(CLI + ["eval", str(run), "--estimator", "exact"])
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(json.loads(done.stdout)["nll"], own)
    torch.testing.assert_close(
        json.loads(done.stdout)["nll"], -_exact_log_px(runner.model.logits, data.test).mean().item()
    )
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    assert main(["compare", str(run)]) == 0  # the runner wrote summary.json from its last test evaluation
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| py-run | Coins | elbo | amortized |") and f"| {own:.2f} ± " in row


def test_a_registered_model_with_a_preset_is_rebuilt_from_a_python_run(tmp_path):
    from models import VAE

    data = load("digits")
    run = tmp_path / "vae"
    config = TrainConfig(epochs=1, max_steps=2, device="cpu", progress=False)
    evaluation = EvalConfig(k=3, limit=5)
    Runner(
        VAE(data.spec, VAE.presets["small"]),
        data,
        ObjectiveConfig(name="iwae", k=2),
        config=config,
        run_dir=run,
        evaluation=evaluation,
    ).fit()
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["name"] == "vae" and saved["objective"]["k"] == 2
    assert saved["model"]["options"] == {"latent_dim": 16, "encoder_hidden": [200], "decoder_hidden": [200]}
    assert load_run(run).model.config == VAE.presets["small"]


class _Local(GenerativeModel):
    pass


def test_what_a_run_directory_cannot_record_is_said_and_training_goes_on(tmp_path, model_file):
    data = load("digits")
    config = TrainConfig(epochs=1, max_steps=1, device="cpu", progress=False)
    Coins = import_model_file(model_file, "Coins")

    class Inner(Coins):
        pass

    with pytest.warns(DGMWarning, match="no config.json, so `dgm` commands cannot load it: .*not a module-level class"):
        Runner(Inner(data.spec), data, ObjectiveConfig(), config=config, run_dir=tmp_path / "a").fit()
    assert (tmp_path / "a" / "final.pt").exists() and not (tmp_path / "a" / "config.json").exists()
    with pytest.warns(DGMWarning, match=r"loaded with seed=0 but TrainConfig.seed=1; .* load\(..., seed=1\)"):
        Runner(
            Coins(data.spec), data, ObjectiveConfig(), config=TrainConfig(seed=1, device="cpu"), run_dir=tmp_path / "b"
        )
    without = load("digits")
    without.source = None  # data that cannot say how to load it again
    with pytest.warns(DGMWarning, match="cannot say it; load the data with experiments.data.load"):
        Runner(Coins(data.spec), without, ObjectiveConfig(), config=config, run_dir=tmp_path / "c")
    assert model_reference(_Local).endswith("test_user_models.py:_Local")  # a module-level class in a file
    Runner(Coins(data.spec), without, ObjectiveConfig(), config=config)  # without a run directory: nothing to record
