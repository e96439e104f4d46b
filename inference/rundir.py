"""The files that describe a run directory, written alike by ``dgm train``
(``experiments.runs.train_run``) and by ``Runner(..., run_dir=...)``, so that ``dgm eval``,
``sample``, ``score``, ``latent`` and ``experiments.runs.load_run`` read either.

* ``config.json``: one object with the sections ``model``, ``data``, ``objective``, ``guide``,
  ``train`` and ``eval`` (``experiments.config.RunConfig`` reads it):

  - ``model``: how to rebuild the model (``models.loading.describe_model``: a registered name
    or ``/path/file.py:Class``, its options, the file's SHA-256);
  - ``data``: how to load the data again (the dataset's ``source``, which
    ``experiments.data.load`` sets; the seed it was loaded with must be the run's seed);
  - ``objective`` / ``guide``: the :class:`~inference.config.ObjectiveConfig` /
    :class:`~inference.config.GuideConfig` they were built from (``make_objective`` and
    ``build_guide`` record it; one built by hand is recorded by its class name and K, which
    is enough to evaluate and sample, not to train again with ``dgm train --config``);
  - ``train`` / ``eval``: the :class:`~inference.config.TrainConfig` and
    :class:`~inference.config.EvalConfig`.

* ``data.json``: the data's spec and training-set size, so a run loads without its data
  (and, where the runner wrote it, ``"writer": "Runner"``).
* ``summary.json``: what ``dgm compare`` tabulates. ``dgm train`` writes its own (with the
  dataset's description, its measures and the model's report); a directory whose
  ``data.json`` the runner wrote gets :func:`summary` from ``Runner.evaluate()`` on the test
  split after ``fit()``.

All are strict JSON (no NaN or Infinity tokens), written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from inference.config import EvalConfig, GuideConfig, ObjectiveConfig, TrainConfig
from models.base import DGMError, GenerativeModel
from models.loading import describe_model

CONFIG, DATA, SUMMARY = "config.json", "data.json", "summary.json"
RUNNER = "Runner"  # data.json's "writer" where the runner wrote the run's description


def finite(obj):
    """``obj`` with every non-finite float replaced by ``None``: strict JSON that every JSON
    reader accepts; ``None`` reads as "not available"."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj) -> None:
    """Strict JSON, written atomically."""
    path = Path(path)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def run_record(
    model: GenerativeModel,
    data,
    objective,
    guide,
    train: TrainConfig,
    evaluation: EvalConfig,
) -> Dict[str, Any]:
    """``config.json`` and ``data.json`` of a run (``{"config": ..., "data": ...}``); a part
    that a run directory cannot record (a model class that cannot be imported again, data
    without a ``source``) raises a one-line ``DGMError`` (the runner warns with it and trains on)."""
    source: Optional[dict] = getattr(data, "source", None)
    if source is None:
        raise DGMError(
            f"a run directory records how to load its data again, and {data.name} cannot say it; "
            "load the data with experiments.data.load(...) (a dataset name or a .npy/.npz/.csv file)"
        )
    source = dict(source)
    seed = source.pop("seed", train.seed)
    if seed != train.seed:
        raise DGMError(
            f"the data was loaded with seed={seed} but TrainConfig.seed={train.seed}; a run directory reloads "
            f"its data with the run's seed: load(..., seed={train.seed})"
        )
    objective_config = objective.config or ObjectiveConfig(name=type(objective).__name__, k=objective.num_particles)
    guide_config = guide.config or GuideConfig(name=guide.describe())
    config = {
        "model": describe_model(model),
        "data": source,
        "objective": asdict(objective_config),
        "guide": asdict(guide_config),
        "train": asdict(train),
        "eval": asdict(evaluation),
    }
    spec = {"spec": model.data_spec.to_json(), "num_train": int(data.train.shape[0]), "writer": RUNNER}
    return {"config": json.loads(json.dumps(config, default=str)), "data": spec}


def write_run_record(run_dir: Path, record: Dict[str, Any]) -> None:
    """Write ``config.json`` and ``data.json`` into ``run_dir`` where they do not exist yet
    (``dgm train`` writes its own first)."""
    for name, key in ((CONFIG, "config"), (DATA, "data")):
        if not (Path(run_dir) / name).exists():
            write_json(Path(run_dir) / name, record[key])


def written_by_runner(run_dir: Path) -> bool:
    """Whether the runner wrote the description of ``run_dir`` (so it writes the summary too)."""
    try:
        return json.loads((Path(run_dir) / DATA).read_text()).get("writer") == RUNNER
    except (OSError, ValueError, AttributeError):
        return False


def summary(config: Dict[str, Any], data_name: str, guide: str, progress: dict, device: str, test: dict) -> dict:
    """``summary.json`` of a runner-written run, in the fields ``dgm compare`` reads:
    ``config`` is the run's ``config.json``, ``progress`` what ``fit()`` returned, ``test``
    the evaluation of the test split."""
    from models.loading import model_label

    objective = config["objective"]
    schedule = [f"KL warm-up {objective.get('kl_warmup')} steps"] if objective.get("kl_warmup") else []
    schedule += [f"free bits {objective.get('free_bits'):g}"] if objective.get("free_bits") else []
    return {
        "model": model_label(config["model"]["name"]),
        "preset": config["model"].get("preset"),
        "data": data_name,
        "objective": objective["name"],
        "k": objective["k"],
        "guide": guide,
        "kl_schedule": ", ".join(schedule) or "-",
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "train_seconds": round(progress["train_seconds"], 2),
        "device": device,
        "best_val_bound": progress["best_val"],
        "test": test,
    }
