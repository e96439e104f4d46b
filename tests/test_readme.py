"""The README's quick tour runs as written and shows what it claims."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_tour_runs_and_is_at_most_30_lines(capsys):
    text = README.read_text()
    tour = re.search(r"## Quick tour.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(tour.strip().splitlines()) <= 30
    exec(compile(tour, "README-tour", "exec"), {"__name__": "tour"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    nlls = [float(re.search(r"test NLL ([0-9.]+)", line).group(1)) for line in lines]
    elbos = [float(re.search(r"ELBO (-[0-9.]+)", line).group(1)) for line in lines]
    assert all(0 < n < 64 * 0.7 for n in nlls)  # better than independent fair coins (44.4 nats)
    assert all(-e >= n - 0.5 for n, e in zip(nlls, elbos))  # the ELBO sits below log p(x)
