"""dgm report: one self-contained HTML page, one section per run, images inlined, no network."""

import base64
import json
import shutil
from html.parser import HTMLParser

import pytest

from experiments.cli import main
from experiments.report import write_report
from models.base import DGMError
from tests.helpers import train_tiny_vae


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.links, self.rows, self.h2 = [], [], [], 0, []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag in ("img", "script", "iframe", "source"):
            self.images.append(attrs.get("src"))
        if "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "tr":
            self.rows += 1
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())
            self._in_h2 = False


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    done = train_tiny_vae(root / "vae")
    unfinished = root / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):  # a run killed before its summary
        shutil.copy(done / name, unfinished / name)
    return done, unfinished


def test_the_report_has_one_section_per_run_and_inlines_every_image(runs, tmp_path, capsys):
    done, unfinished = runs
    out = tmp_path / "report.html"
    assert main(["report", str(done), str(unfinished), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.sections == ["vae", "unfinished"]
    assert not any(src is None or src.startswith(("http:", "https:", "//")) for src in page.images + page.links)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    # the finished run: curves and samples; the unfinished one: curves drawn from its metrics
    assert len(page.images) == 3
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((done / "summary.json").read_text())
    assert f"{summary['test']['nll']:.2f}" in text  # the summary table's test NLL
    assert "not finished" in text
    assert "share of test points with PSIS k-hat" in text  # IS declares k-hat as its trust figure
    assert f"{summary['test']['khat_frac_above_0.7']:.1%}" in text


def test_the_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(DGMError, match="not a run directory"):
        write_report([tmp_path], tmp_path / "r.html")
