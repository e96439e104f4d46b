"""Run directories and configs: config.json round-trips, finished runs load without any
training or data pass, and unknown parts are refused with their registry's choices (what
`dgm list` and the CLI flags show is tested in ``test_cli``)."""

import json

import pytest
import torch

from experiments import runs
from experiments.cli import build_parser, main
from experiments.config import RunConfig, read_config
from inference import ESTIMATORS, GUIDES, OBJECTIVES, EvalConfig, evaluate
from models import MODELS

TINY = ["--data", "digits", "--preset", "small", "--epochs", "1", "--max-steps", "3", "--device", "cpu"]
TINY += ["--eval-k", "3", "--eval-limit", "10", "--no-progress"]


def test_config_json_round_trips_and_reproduces_the_run_bit_for_bit(tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", "vae", *TINY, "--objective", "iwae", "--k", "2", "--run-dir", str(first)]) == 0
    config = read_config(first / "config.json")
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert config.objective.name == "iwae" and config.objective.k == 2 and config.eval.k == 3
    assert main(["train", "--config", str(first / "config.json"), "--run-dir", str(again)]) == 0
    a = torch.load(first / "final.pt", weights_only=True)
    b = torch.load(again / "final.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = (json.loads((d / "summary.json").read_text())["test"] for d in (first, again))
    assert sa["nll"] == sb["nll"] and sa["elbo"] == sb["elbo"]


def test_config_flags_change_a_loaded_config(tmp_path):
    base = RunConfig.from_flat(model="vae", data="digits", epochs=7, eval_k=11, opt={"latent_dim": 3})
    args = build_parser().parse_args(["train", "--k", "4", "--opt", "hidden=5"])
    from experiments.config import config_from_args

    changed = config_from_args(args, base)
    assert changed.objective.k == 4 and changed.train.epochs == 7 and changed.eval.k == 11
    assert changed.model.options == {"latent_dim": 3, "hidden": 5}


def test_the_flat_format_of_earlier_versions_still_reads():
    legacy = {
        "model": "vae",
        "preset": "small",
        "options": {"latent_dim": 2},
        "data": "digits",
        "objective": "iwae",
        "k": 5,
        "guide": "iaf",
        "flow_depth": 3,
        "train": {"epochs": 4, "eval_k": 50, "eval_limit": 10, "device": "cpu"},
    }
    config = RunConfig.from_json(legacy)
    assert (config.model.name, config.model.preset, config.model.options) == ("vae", "small", {"latent_dim": 2})
    assert (config.objective.name, config.objective.k, config.guide.name, config.guide.flow_depth) == (
        "iwae",
        5,
        "iaf",
        3,
    )
    assert (config.train.epochs, config.eval.k, config.eval.limit) == (4, 50, 10)


def test_a_finished_run_loads_without_training_or_data(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--run-dir", str(run_dir)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}

    def no_data(*a, **k):
        raise AssertionError("load_run touched the data")

    monkeypatch.setattr(runs, "load_data", no_data)
    monkeypatch.setattr(runs.Runner, "fit", lambda self: pytest.fail("load_run trained"))
    run = runs.load_run(run_dir)
    assert run.finished and not run.model.training
    final = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(v, final[k]) for k, v in run.model.state_dict().items())
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # nothing rewritten
    # and the standalone evaluation works on the restored pair
    x = torch.bernoulli(torch.full((6, 64), 0.3))
    out = evaluate(run.model, run.guide, x, EvalConfig(estimator="is", k=5))
    assert out["n"] == 6 and out["settings"] == {"K": 5} and torch.isfinite(torch.tensor(out["nll"]))


def test_a_python_api_run_is_a_run_directory_the_cli_accepts(tmp_path, capsys):
    config = RunConfig.from_flat(model="vae", preset="small", data="digits", epochs=1, max_steps=2, device="cpu")
    config.eval.k, config.eval.limit, config.train.progress = 3, 5, False
    runs.train_run(config, tmp_path / "api")
    assert main(["eval", str(tmp_path / "api"), "--k", "2", "--limit", "3"]) == 0
    assert main(["compare", str(tmp_path / "api")]) == 0
    assert "vae[small]" in capsys.readouterr().out


def test_unknown_parts_are_refused_with_the_choices():
    from models.registry import UnknownPartError

    for registry in (MODELS, OBJECTIVES, GUIDES, ESTIMATORS):
        with pytest.raises(UnknownPartError, match="choose from"):
            registry.get("no-such-part")


def test_compare_rows_name_the_estimator_settings_and_its_trust_figures(tmp_path):
    base = {"model": "vae", "preset": None, "objective": "elbo", "k": 1, "guide": "amortized", "epochs": 1}
    base.update(train_seconds=1.0, data="d")
    ais = {"estimator": "ais", "settings": {"steps": 100, "chains": 16}, "K": None, "n": 5, "nll": 90.0}
    ais.update(nll_stderr=1.0, mc_stderr_mean=0.05, accept_mean=0.64, trust=["mc_stderr_mean", "accept_mean"])
    imp = {"estimator": "is", "settings": {"K": 50}, "K": 50, "n": 5, "nll": 91.0, "nll_stderr": 1.0}
    imp.update({"mc_stderr_mean": 0.3, "khat_frac_above_0.7": 0.8, "trust": ["khat_frac_above_0.7"]})
    bdmc = {"steps": 100, "chains": 16, "n": 10, "gap": 0.42}
    for name, test, extra in (("a", ais, {"bdmc": bdmc}), ("i", imp, {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({**base, **extra, "test": test}))
    table = runs.compare([tmp_path / "a", tmp_path / "i"])
    header, _, row_ais, row_is = table.splitlines()[:4]
    cells = {name: dict(zip(header.split("|"), row.split("|"))) for name, row in (("a", row_ais), ("i", row_is))}
    assert cells["a"][" estimator "].strip() == "ais steps=100 chains=16"
    assert cells["a"][" chains' stderr "].strip() == "0.050" and cells["i"][" chains' stderr "].strip() == "-"
    assert cells["a"][" AIS accept "].strip() == "0.64"
    assert cells["a"][" BDMC gap "].strip() == "0.42 (T=100, C=16, n=10)"
    assert cells["i"][" k-hat>0.7 "].strip() == "80.0%" and cells["i"][" estimator "].strip() == "is K=50"
