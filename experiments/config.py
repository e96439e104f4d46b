"""The configuration of a run, nested by component, and the ``dgm`` flags made from it.

    RunConfig
      model:     ModelConfig      (name, preset, options)
      data:      DataConfig       (name, binarization, split, labelled)
      objective: ObjectiveConfig  (inference.config)
      guide:     GuideConfig      (inference.config)
      train:     TrainConfig      (inference.config)
      eval:      EvalConfig       (inference.config)

``config.json`` is ``RunConfig.to_json()``; ``RunConfig.from_json`` reads it back (and the
flat format written before the nesting), so ``dgm train --config RUN/config.json``
reproduces a run. Every setting is one dataclass field with its help; :data:`FLAGS` maps
each command-line flag to its (section, field), and :func:`add_flags` /
:func:`config_from_args` are the only places flags are defined and read. The same flat
names build a config in Python: ``RunConfig.from_flat(model="vae", data="digits",
objective="iwae", k=5, epochs=20, eval_k=5000)``.
"""

from __future__ import annotations

import argparse
import ast
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from inference.config import (
    ConfigError,
    EvalConfig,
    GuideConfig,
    ObjectiveConfig,
    TrainConfig,
    from_dict,
    require,
    setting,
)
from models.base import DGMError


@dataclass
class ModelConfig:
    name: str = setting("vae", "model name (see `dgm list`) or path/to/file.py:ClassName", flag="model")
    preset: Optional[str] = setting(None, "named model configuration (see `dgm list`)")
    options: Dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "override one model option, e.g. --opt latent_dim=20 (repeatable)", "flag": "opt"},
    )
    sha256: Optional[str] = setting(
        None, "SHA-256 of a model file, recorded when the run starts", flag="model_sha256", cli=False, display=True
    )

    def check(self) -> None:
        require(isinstance(self.options, dict), f"model options must be a mapping, got {self.options!r}")


@dataclass
class DataConfig:
    name: str = setting("mnist-embedded", "dataset name (see `dgm list`) or a .npy/.npz/.csv file", flag="data")
    binarization: str = setting("dynamic", "binarization of MNIST", choices=("dynamic", "static", "none"))
    split: str = setting("59600/400", "train/validation split of MNIST", choices=("59600/400", "50000/10000"))
    labelled: Optional[int] = setting(None, "semi-supervised (m2): keep N training labels, class-balanced")
    spec: Optional[str] = setting(
        None, "support of a data file (--data FILE): binary, categorical:K or real (default inferred)", flag="data_spec"
    )
    sha256: Optional[str] = setting(
        None, "SHA-256 of a data file, recorded when the run starts", flag="data_sha256", cli=False, display=True
    )

    def check(self) -> None:
        require(self.labelled is None or self.labelled >= 1, f"--labelled must be >= 1, got {self.labelled}")


SECTIONS: Dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "guide": GuideConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
PREFIX = {"eval": "eval_"}  # flat names of sections whose field names would collide


@dataclass
class RunConfig:
    """Everything that defines a run; written to ``config.json``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        """Every section's value ranges (what needs no model or data to check)."""
        for name in SECTIONS:
            getattr(self, name).check()

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a run config is a JSON object, got {type(d).__name__}")
        if isinstance(d.get("model"), str):  # the flat format written before the nesting
            return RunConfig.from_flat(**_unflatten_legacy(d))
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        config = RunConfig(**{name: from_dict(cls, d.get(name), name) for name, cls in SECTIONS.items()})
        if config.model.options is None:
            config.model.options = {}
        return config

    @staticmethod
    def from_flat(**values) -> "RunConfig":
        """A config from flat names (the flags' names with underscores: ``model``,
        ``preset``, ``data``, ``objective``, ``k``, ``epochs``, ``eval_k``, ...), the rest
        at their defaults; ``train=`` / ``eval=`` may also give whole sections."""
        whole = {name: values.pop(name) for name in ("train", "eval") if isinstance(values.get(name), SECTIONS[name])}
        values = {("opt" if key == "options" else key): value for key, value in values.items()}
        return RunConfig(**whole).changed(values)

    def changed(self, values: Dict[str, Any]) -> "RunConfig":
        """This config with the settings ``values`` (by flat name) replaced."""
        sections: Dict[str, dict] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key not in FLAT:
                raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(FLAT))}")
            section, name = FLAT[key]
            sections[section][name] = value
        return RunConfig(**{name: replace(getattr(self, name), **sections[name]) for name in SECTIONS})

    def describe(self) -> str:
        """``model[preset] on data`` (a file model by its class name, a data file by its name)."""
        from models.loading import model_label

        preset = f"[{self.model.preset}]" if self.model.preset else ""
        return f"{model_label(self.model.name)}{preset} on {Path(self.data.name).name}"


def _flag_names() -> Dict[str, Tuple[str, str]]:
    """Flat name (the flag without ``--``, underscores) -> (section, field)."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            flat = f.metadata.get("flag", PREFIX.get(section, "") + f.name)
            out[flat] = (section, f.name)
    return out


FLAT = _flag_names()


def display_only() -> List[Tuple[str, str]]:
    """(section, field) of the settings that change only what is shown or where it runs."""
    return [(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls) if f.metadata.get("display")]


def defining(config_json: dict) -> dict:
    """A config without its display-only fields: two configs that agree here are one run."""
    out = {name: dict(section) for name, section in config_json.items()}
    for section, name in display_only():
        out.get(section, {}).pop(name, None)
    return out


def differences(a: dict, b: dict) -> List[str]:
    """The settings (flat names) in which two defining configs differ, with both values."""
    diffs = []
    for flat, (section, name) in FLAT.items():
        va, vb = a.get(section, {}).get(name), b.get(section, {}).get(name)
        if va != vb and (section, name) not in display_only():
            diffs.append(f"--{flat.replace('_', '-')} {va!r} -> {vb!r}")
    return diffs


def non_default_settings(config: "RunConfig") -> Dict[str, Any]:
    """The defining settings of ``config`` (flat names, in flag order) whose values differ
    from a default ``RunConfig``'s; ``opt`` holds only the model options given."""
    ours, default = config.to_json(), RunConfig().to_json()
    out = {}
    for flat, (section, name) in FLAT.items():
        value = ours.get(section, {}).get(name)
        if (section, name) not in display_only() and value != default.get(section, {}).get(name):
            out[flat] = value
    return out


# --- legacy -----------------------------------------------------------------------------------
def _unflatten_legacy(d: dict) -> dict:
    """The flat ``RunSpec`` JSON of earlier versions as flat names of :meth:`from_flat`."""
    d = dict(d)
    train = dict(d.pop("train", {}) or {})
    flat = {("opt" if k == "options" else k): v for k, v in d.items()}
    for key in ("eval_estimator", "eval_k", "eval_limit", "eval_batch_size"):
        if key in train:
            flat[key] = train.pop(key)
    if "local_eval_epochs" in train:
        flat["refit_epochs"] = train.pop("local_eval_epochs")
    known = {f.name for f in fields(TrainConfig)}
    flat.update({k: v for k, v in train.items() if k in known})
    flat["opt"] = dict(flat.get("opt") or {})
    return flat


# --- the command line -----------------------------------------------------------------------
def parse_option(text: str) -> Tuple[str, Any]:
    """``--opt key=value``: the value as a Python literal where it is one, else a string."""
    if "=" not in text:
        raise DGMError(f"--opt expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key, parsed


def _value_type(hint) -> Optional[type]:
    """``int`` for ``int`` and ``Optional[int]`` (likewise float, str); ``None`` otherwise."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        hint = next(a for a in args if a is not type(None))
    return hint if hint in (int, float, str) else None


def add_flags(parser: argparse.ArgumentParser, sections=tuple(SECTIONS), choices: Optional[dict] = None) -> None:
    """Add the flags of ``sections`` to ``parser`` (defaults suppressed: a flag not given
    leaves the config's value, so ``--config FILE`` plus flags means "FILE, changed so").
    ``choices``: flat name -> allowed values (from the registries)."""
    choices = choices or {}
    for section in sections:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.metadata.get("cli") is False:
                continue
            flat = f.metadata.get("flag", PREFIX.get(section, "") + f.name)
            if flat == "model":
                continue  # the positional argument
            default = f.default if f.default is not MISSING else "{}"
            help_text = f"{f.metadata.get('help', '')} (default: {default})"
            kwargs = dict(dest=flat, default=argparse.SUPPRESS, help=help_text)
            if flat == "opt":
                parser.add_argument("--opt", action="append", metavar="KEY=VALUE", **kwargs)
            elif hints[f.name] is bool:
                parser.add_argument(f"--{flat.replace('_', '-')}", action="store_true", **kwargs)
            else:
                allowed = choices.get(flat, f.metadata.get("choices"))
                parser.add_argument(
                    f"--{flat.replace('_', '-')}",
                    type=_value_type(hints[f.name]),
                    choices=allowed if isinstance(allowed, list) else list(allowed) if allowed else None,
                    **kwargs,
                )


def config_from_args(args: argparse.Namespace, base: Optional[RunConfig] = None) -> RunConfig:
    """``base`` (default: all defaults) changed by every flag given on the command line."""
    given = {flat: getattr(args, flat) for flat in FLAT if flat in vars(args)}
    if given.get("model") is None:
        given.pop("model", None)  # the optional positional model name, not given
    if "opt" in given:
        given["opt"] = dict(parse_option(o) for o in given["opt"])
    if getattr(args, "no_progress", False):
        given["progress"] = False
    base = base or RunConfig()
    if "opt" in given:  # options add to those of the base config
        given["opt"] = {**base.model.options, **given["opt"]}
    return base.changed(given)


def read_config(path: Path) -> RunConfig:
    """A ``config.json``, refused in one line (naming the file) when it cannot be read."""
    path = Path(path)
    try:
        return RunConfig.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DGMError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DGMError(f"{path} is not valid JSON ({e}); restore it or delete the run directory") from None
    except (ConfigError, TypeError) as e:
        raise DGMError(f"{path} is not a pyro-dgm run config: {e}") from None
