"""``dgm --help`` and ``dgm list`` load no plotting or statistics library: those load only in the
commands that use them (``benchmarks/startup.py`` measures the start-up cost itself)."""

import pytest

from benchmarks.startup import HEAVY, heavy_modules


@pytest.mark.parametrize("argv", [["--help"], ["list"]], ids=["help", "list"])
def test_cli_start_up_loads_no_heavy_library(argv):
    assert heavy_modules(argv) == []


def test_the_probe_sees_a_heavy_library_when_one_is_loaded():
    assert "matplotlib" in HEAVY
    assert "matplotlib" in heavy_modules(["latent", "--help"])  # its help lists the views of a plotting module
