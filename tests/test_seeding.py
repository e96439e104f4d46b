"""One way to seed a Python run (``inference.set_seed`` before building the model): the
README's quick tour prints the same numbers every time it runs."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from inference import set_seed
from models import VAE
from models.base import DataSpec, DGMError
from tests.helpers import ROOT

README = ROOT / "README.md"


def _tour(small: bool) -> str:
    tour = re.search(r"## Quick tour.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    if small:  # the same program on a small budget: 1 epoch, K = 20 on 40 test points
        assert "epochs=20" in tour and "EvalConfig(k=500)" in tour
        tour = tour.replace("epochs=20", "epochs=1").replace("EvalConfig(k=500)", "EvalConfig(k=20, limit=40)")
    return tour


def _run_in_process(tour: str, capsys) -> str:
    exec(compile(tour, "README-tour", "exec"), {"__name__": "tour"})
    return capsys.readouterr().out


def test_set_seed_fixes_the_initial_weights_and_every_generator():
    spec = DataSpec((6,), "binary")
    draws = []
    for _ in range(2):
        set_seed(5)
        weights = VAE(spec).state_dict()
        draws.append((weights, random.random(), np.random.rand(), torch.rand(1)))
    (w1, *rest1), (w2, *rest2) = draws
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and rest1 == rest2
    set_seed(6)
    assert not torch.equal(VAE(spec).state_dict()["decoder.0.weight"], w1["decoder.0.weight"])
    with pytest.raises(DGMError, match="a seed is an integer"):
        set_seed(1.5)


def test_the_readme_tour_prints_the_same_numbers_twice(capsys, one_thread):
    """Run twice in one process, the second run starts from whatever random state the first
    left: without ``set_seed`` before the model is built, its first model differs."""
    tour = _tour(small=True)
    assert "set_seed(0)" in tour
    first, second = _run_in_process(tour, capsys), _run_in_process(tour, capsys)
    assert len(first.strip().splitlines()) == 3 and "test NLL" in first
    assert first == second


@pytest.mark.slow
def test_the_readme_tour_prints_the_same_numbers_in_two_processes():
    """The tour as written (20 epochs, K = 500), in two fresh interpreters."""
    script = "import sys\nexec(compile(sys.stdin.read(), 'README-tour', 'exec'), {'__name__': 'tour'})\n"
    tour = _tour(small=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(textwrap.dedent(tour), timeout=1800)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(outs[0].strip().splitlines()) == 3 and outs[0] == outs[1], outs
