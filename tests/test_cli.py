"""The command line (``experiments.cli``): one-line errors, run directories it refuses, and
flags and choices that are the registries and the config fields."""

from experiments.cli import build_parser, main
from experiments.config import FLAT
from experiments.data import DATASETS
from inference import ESTIMATORS, GUIDES, OBJECTIVES
from models import MODELS
from tests.helpers import CLI, TINY_EVAL, run_cli


def test_cli_errors_are_one_line():
    out = run_cli(CLI + ["train", "nosuchmodel", "--data", "digits"])
    assert out.returncode == 2
    assert out.stderr.strip().startswith("dgm: error: unknown model 'nosuchmodel'")
    assert "Traceback" not in out.stderr
    out = run_cli(CLI + ["train", "vae", "--data", "nosuchdata"])
    assert out.returncode == 2 and "nosuchdata" in out.stderr and "Traceback" not in out.stderr


def test_cli_refuses_a_run_directory_with_another_configuration(tmp_path):
    args = CLI + ["train", "vae", "--data", "digits", "--max-steps", "2", "--run-dir", str(tmp_path)] + TINY_EVAL
    assert run_cli(args).returncode == 0
    out = run_cli(args + ["--preset", "small"])
    assert out.returncode == 2 and "different configuration" in out.stderr
    # what is only printed or logged does not make another run: the finished run is reused
    out = run_cli([a for a in args if a != "--no-progress"] + ["--log-every", "7"])
    assert out.returncode == 0, out.stderr


def test_registries_are_the_cli_choices_and_what_dgm_list_shows(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for registry in (MODELS, DATASETS, OBJECTIVES, GUIDES, ESTIMATORS):
        assert len(registry) and all(f"  {name} " in listed for name in registry)
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in train._actions}
    assert choices["objective"] == OBJECTIVES.names() and choices["guide"] == GUIDES.names()
    assert choices["data"] == DATASETS.names() and choices["eval_estimator"] == ["auto"] + ESTIMATORS.names()
    assert set(FLAT) - {"model"} <= set(choices) | {"validate", "progress", "model_sha256", "data_sha256"}


def test_every_flag_maps_to_one_config_field():
    sections = {}
    for flat, (section, name) in FLAT.items():
        assert (section, name) not in sections.values(), flat
        sections[flat] = (section, name)
    assert FLAT["k"] == ("objective", "k") and FLAT["eval_k"] == ("eval", "k") and FLAT["data"] == ("data", "name")
