"""Default names of run directories, and what a run's name and labels leave out.

``runs/<model>[-<preset>]-<data>[-<objective><K>-<guide>]-s<seed>[-<other settings>]``:
the other settings are every defining setting (see ``experiments.config.defining``) that
differs from its default, as ``<flag><value>`` (``-epochs40-lr0.003-latent_dim8``), so two
commands that differ in any setting never share a directory. Where they would take more
than ``SUFFIX_LIMIT`` characters they are replaced by ``cfg`` and a stable 8-digit hash of
them (SHA-1 of their JSON).

A fully observed model (``GenerativeModel.fully_observed``: autoregressive models and
flows) is fitted on log p(x) itself: whatever the objective, K or guide settings, they
change nothing, so its name, summary and ``dgm compare`` row show none of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict

NAMED = ("model", "preset", "data", "objective", "k", "guide", "seed")
"""Flat settings the name's fixed part shows."""
SUFFIX_LIMIT = 60
FIT_SECTIONS = ("objective", "guide")
"""Sections of settings that a fully observed model does not use."""


def _model_class(name: str):
    from models.registry import MODELS

    if name in MODELS:
        return MODELS[name]
    from models.loading import resolve_model  # a model file: path/to/file.py:ClassName

    return resolve_model(name)


def _model_label(name: str) -> str:
    from models.registry import MODELS

    if name in MODELS:
        return name
    from models.loading import model_label  # a model file: its class name

    return model_label(name)


def fully_observed(config) -> bool:
    """Whether the run's model has no latent sites (``fully_observed``)."""
    return bool(getattr(_model_class(config.model.name), "fully_observed", False))


def _token(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_")


def other_settings(config) -> Dict[str, Any]:
    """The settings (flat names) that differ from the defaults and that the name's fixed
    part does not show; model options one by one (``latent_dim``: 8)."""
    from experiments.config import FLAT, non_default_settings

    skip_sections = FIT_SECTIONS if fully_observed(config) else ()
    out = {}
    for flat, value in non_default_settings(config).items():
        if flat in NAMED or FLAT[flat][0] in skip_sections:
            continue
        if flat == "opt":
            out.update({str(key): value[key] for key in sorted(value)})
        else:
            out[flat] = value
    return out


def run_name(config) -> str:
    """The default run directory name of ``config`` (see the module docstring)."""
    from pathlib import Path

    preset = f"-{config.model.preset}" if config.model.preset else ""
    model, data = _model_label(config.model.name), Path(config.data.name).stem  # a file by its name
    name = f"{model}{preset}-{data}"
    if not fully_observed(config):
        o = config.objective
        k = f"{o.k}" if o.k > 1 or o.name == "iwae" else ""
        name += f"-{o.name}{k}-{config.guide.name}"
    name += f"-s{config.train.seed}"
    others = other_settings(config)
    suffix = "".join(f"-{flat}{_token(value)}" for flat, value in others.items())
    if len(suffix) > SUFFIX_LIMIT:
        digest = hashlib.sha1(json.dumps(others, sort_keys=True, default=str).encode()).hexdigest()[:8]
        suffix = f"-cfg{digest}"
    return name + suffix
