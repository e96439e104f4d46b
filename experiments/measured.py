"""Estimates of log p(x) kept in a run, for the tables that compare estimators on the same
images (``dgm reproduce eval-quality``, ``dgm reproduce NAME --ais-check N``).

Each row is appended to ``RUN/eval-quality.jsonl`` as soon as it is measured, with its
per-image values and a fingerprint of the run's weights, under a key of its estimator,
settings and number of images; a later call on the same weights reuses it, so an
interrupted evaluation resumes where it stopped and two processes can measure two runs at
once. The file keeps the name eval-quality gave it: the rows measured there (IS at the
mnist-iwae K and AIS at T = 1,000 on the first 100 images) serve the AIS check as they are.
"""

from __future__ import annotations

import json
import math
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np

CACHE = "eval-quality.jsonl"


def fingerprint(run_dir: Path) -> str:
    """Which weights a kept row was measured on (size and mtime of ``final.pt``)."""
    st = (Path(run_dir) / "final.pt").stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def key(estimator: str, settings: Dict, n: int) -> str:
    return json.dumps([estimator, settings, n], sort_keys=True)


def paired_difference(values: Sequence[float], base: Sequence[float]) -> str:
    """``values - base`` image by image (the same images): the mean difference ± its standard
    error, in which the spread of log p(x) over images cancels."""
    if len(values) != len(base):
        raise ValueError(f"paired estimates need the same images, got {len(values)} and {len(base)}")
    d = np.asarray(values, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return f"{d.mean():+.2f} ± {se:.2f}"


class Kept:
    """The rows kept in one run (those measured on its current weights). ``get`` returns a
    kept row or measures, keeps and returns it; the run is loaded only to measure."""

    def __init__(self, run_dir: Union[str, Path], tag: str):
        self.dir, self.tag = Path(run_dir), tag  # tag: the progress lines' prefix
        self.rows: Dict[str, Dict] = {}
        path, fp = self.dir / CACHE, fingerprint(self.dir)
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: measured again
                continue
            if row.get("fingerprint") == fp:
                self.rows[row["key"]] = row

    @cached_property
    def run(self):
        from experiments.runs import load_run

        return load_run(self.dir)

    def get(self, estimator: str, settings: Dict, n: int, measure: Optional[Callable[[], Dict]] = None) -> Dict:
        """The row of ``estimator`` with ``settings`` on the first ``n`` test images;
        ``measure`` (default: :meth:`evaluate`) makes the row's fields when it is not kept
        (and its ``seconds``, unless it leaves them to the wall time of the call)."""
        k = key(estimator, settings, n)
        if k not in self.rows:
            print(f"[{self.tag}] {self.dir.name}: {estimator} {settings}, n = {n}", flush=True)
            t0 = time.time()
            row = measure() if measure is not None else self.evaluate(estimator, settings, n)
            row = {"seconds": time.time() - t0, **row}  # unless measure timed itself
            row = dict(key=k, fingerprint=fingerprint(self.dir), run=self.dir.name, estimator=estimator,
                       settings=settings, **row)  # fmt: skip
            with open(self.dir / CACHE, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.rows[k] = row
        return self.rows[k]

    def evaluate(self, estimator: str, settings: Dict, n: int) -> Dict:
        """Mean log p(x), standard error, trust figures and per-image values on the first
        ``n`` test images (with the conditions of a model that uses labels)."""
        from experiments.runs import split_data
        from inference.config import EvalConfig
        from inference.evaluation import evaluate

        run = self.run
        x, conditions = split_data(run)
        config = EvalConfig(estimator=estimator, limit=n, **settings)
        t0 = time.time()  # after loading the run and its data
        out = evaluate(
            run.model, run.guide, x, config, conditions=conditions, num_particles=run.config.objective.k,
            train=run.config.train, keep_values=True,
        )  # fmt: skip
        trust = ", ".join(f"{field} {out[field]:.3g}" for field in out["trust"])
        return dict(
            n=out["n"], log_px=-out["nll"], stderr=out["nll_stderr"], trust=trust, seconds=time.time() - t0,
            values=out["log_px"],
        )  # fmt: skip
