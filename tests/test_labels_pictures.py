"""Honest labels and readable pictures: fully observed models carry no objective, K or
guide; sample grids have a light frame that is neither ink nor paper; dgm list shows plain
text aligned under any name length."""

import json

import torch
from matplotlib.colors import to_rgb

from experiments.cli import _print_table, main, plain
from experiments.plots import FRAME_COLOUR, grid_cmap, image_grid
from experiments.runs import compare


def test_a_fully_observed_run_names_no_objective_k_or_guide(tmp_path, capsys):
    run = tmp_path / "nade"
    args = ["train", "nade", "--data", "digits", "--preset", "small", "--epochs", "1", "--max-steps", "2"]
    assert main([*args, "--device", "cpu", "--no-progress", "--k", "5", "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["estimator"] == "exact"
    assert not {"objective", "k", "guide", "kl_schedule"} & set(summary)
    table = compare([run])
    header = table.splitlines()[0]
    assert "objective" not in header and "guide" not in header and "K=" not in table


def test_the_grid_frame_is_light_and_neither_ink_nor_paper():
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    grid = image_grid(x, (2, 2), nrow=2)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert torch.equal(grid[1:3, 1:3], x[0].reshape(2, 2)) and torch.equal(grid[1:3, 4:6], x[1].reshape(2, 2))
    frame = torch.ones_like(grid, dtype=torch.bool)
    for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
        frame[1 + 3 * r : 3 + 3 * r, 1 + 3 * c : 3 + 3 * c] = False
    assert torch.isnan(grid[frame]).all() and not torch.isnan(grid[1:3, 1:3]).any()
    assert torch.isnan(grid[4:6, 4:6]).all()  # the empty fourth tile is frame-coloured, not paper
    cmap = grid_cmap()
    ink, paper, bad = to_rgb(cmap(1.0)), to_rgb(cmap(0.0)), to_rgb(cmap(float("nan")))
    assert bad == to_rgb(FRAME_COLOUR)
    luminance = lambda c: 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]  # noqa: E731
    assert luminance(bad) > 0.6  # light: strokes do not merge with it
    assert min(sum(abs(a - b) for a, b in zip(bad, other)) for other in (ink, paper)) > 0.2


def test_dgm_list_is_plain_text_aligned_under_any_name(capsys, monkeypatch):
    assert plain(":func:`inference.evaluate` and :class:`~inference.guides.Guide`, ``K``") == (
        "inference.evaluate and Guide, K"
    )
    monkeypatch.setenv("COLUMNS", "80")
    long_name = "a-model-with-a-very-long-name-indeed"
    _print_table("models", [("vae", "short " * 30), (long_name, "described ``here``")])
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    column = lines[1].index("short")
    assert all(line[:column].strip() == "" for line in lines[2:] if line.strip() and long_name not in line)
    assert lines[-2] == f"  {long_name}" and lines[-1].strip() == "described here"
    assert lines[-1].index("described") == column
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ":class:" not in out
