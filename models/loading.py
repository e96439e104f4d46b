"""Where a model class comes from: the one place that turns a model reference into a class.

A model reference is one of

* a registered name (``vae``, ``made``, ...; ``dgm list`` shows them);
* the name of a model an installed package declares in the entry-point group
  ``pyro_dgm.models`` (registered in ``MODELS`` when ``models`` is imported, so it is also
  a registered name)::

      # the package's pyproject.toml
      [project.entry-points."pyro_dgm.models"]
      my-vae = "my_package.models:MyVAE"

* ``path/to/file.py:ClassName``: a :class:`~models.base.GenerativeModel` subclass defined
  in a file, imported by path (the file's folder is on ``sys.path`` while it is imported, so
  it may import its neighbours). The file is executed when it is imported: keep a script's
  training code under ``if __name__ == "__main__":``.

A model is rebuilt as ``cls(data_spec)`` when it has no ``config_class``, else as
``cls(data_spec, config)`` with ``config`` an instance of its ``config_class``
(:meth:`~models.base.GenerativeModel.construction_options` gives the fields that differ from
the defaults). A run directory records a file model as ``/absolute/path.py:ClassName`` with
the file's SHA-256 (:func:`canonical_reference`); loading the run imports the file again
and warns (:class:`~models.base.DGMWarning`) when it changed since
(:func:`warn_if_changed`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type

from models.base import DGMError, DGMWarning, GenerativeModel
from models.registry import MODELS, UnknownPartError

ENTRY_POINT_GROUP = "pyro_dgm.models"
"""The entry-point group in which installed packages declare their models."""

PLUGIN_ERRORS: Dict[str, str] = {}
"""Entry-point name -> why its model could not be registered (reported when it is asked for)."""

_FILE_MODULES = "pyro_dgm_user_models"  # the prefix of the module names of imported model files


def is_file_reference(ref: str) -> bool:
    """Whether ``ref`` has the form ``path/to/file.py:ClassName``."""
    path, sep, name = ref.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(name)


def split_file_reference(ref: str) -> Tuple[Path, str]:
    path, _, name = ref.rpartition(":")
    return Path(path), name


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_model(ref: str) -> Type[GenerativeModel]:
    """The model class ``ref`` names (a registered name or ``file.py:ClassName``); a one-line
    :class:`~models.base.DGMError` when there is none."""
    if ref in MODELS:
        return MODELS[ref]
    if is_file_reference(ref):
        return import_model_file(*split_file_reference(ref))
    if ref in PLUGIN_ERRORS:
        raise DGMError(f"model {ref!r} (entry point in {ENTRY_POINT_GROUP}) cannot be loaded: {PLUGIN_ERRORS[ref]}")
    try:
        return MODELS[ref]
    except UnknownPartError as e:
        raise UnknownPartError(f"{e}; or give a model of your own as path/to/file.py:ClassName") from None


def import_model_file(path: Path, class_name: str) -> Type[GenerativeModel]:
    """The ``GenerativeModel`` subclass ``class_name`` defined in the file ``path``. A file is
    imported once per content (a changed file is imported afresh)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DGMError(f"model file {path} does not exist; give path/to/file.py:ClassName")
    digest = file_sha256(path)
    where = hashlib.sha256(str(path).encode()).hexdigest()[:8]  # one module per file and content
    module_name = f"{_FILE_MODULES}.{_identifier(path.stem)}_{where}_{digest[:16]}"
    module = sys.modules.get(module_name)
    if module is None:
        module = _execute(path, module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        defined = [n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module_name]
        raise DGMError(
            f"{path} defines no class {class_name!r}"
            + (f"; classes defined there: {', '.join(defined)}" if defined else "; it defines no class")
        )
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
        raise DGMError(
            f"{path}:{class_name} is not a GenerativeModel subclass (models.base.GenerativeModel); "
            "a model class implements model, guide and sample"
        )
    return cls


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _execute(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise DGMError(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(_FILE_MODULES, type(sys)(_FILE_MODULES))  # the parent of the file modules
    sys.modules[module_name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DGMError(f"importing the model file {path} failed: {type(e).__name__}: {first}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


# --- what a run directory records -------------------------------------------------------------
def canonical_reference(ref: str) -> Tuple[str, Optional[str]]:
    """``(reference, sha256)`` as a run directory records them: a file reference with the
    file's absolute path and its SHA-256 (the class is imported, so a wrong reference is
    refused here); a registered name as it is, with ``None``."""
    if not is_file_reference(ref):
        resolve_model(ref)
        return ref, None
    path, name = split_file_reference(ref)
    path = path.expanduser().resolve()
    import_model_file(path, name)
    return f"{path}:{name}", file_sha256(path)


def model_reference(cls: Type[GenerativeModel]) -> str:
    """The reference that rebuilds ``cls``: its registered name, or ``/path/file.py:Class``.
    A class that cannot be imported again (defined inside a function, in an interactive
    session or in ``exec``'d code) is refused in one line."""
    registered = [entry.name for entry in MODELS.entries() if entry.factory is cls]
    if registered:
        return registered[0]
    if "<locals>" in cls.__qualname__ or "." in cls.__qualname__:
        raise DGMError(
            f"{cls.__qualname__} is not a module-level class, so a run directory cannot rebuild it; "
            "define it at the top level of a .py file"
        )
    try:
        path = Path(inspect.getfile(cls)).resolve()
    except (TypeError, OSError):
        path = None
    if path is None or path.suffix != ".py" or not path.is_file():
        raise DGMError(
            f"{cls.__qualname__} was not defined in a .py file (interactive session or exec), so a run directory "
            "cannot rebuild it; define it in a file (e.g. my_model.py) and import it from there"
        )
    return f"{path}:{cls.__qualname__}"


def model_label(ref: str) -> str:
    """A short name for ``ref`` (run-directory names, titles): the registered name, or the
    class name of a file reference."""
    return split_file_reference(ref)[1] if is_file_reference(ref) else ref


def describe_model(model: GenerativeModel) -> Dict[str, Any]:
    """The ``model`` section of a run's ``config.json`` that rebuilds ``model``:
    ``{"name": reference, "preset": None, "options": {...}, "sha256": file hash or None}``."""
    ref = model_reference(type(model))
    sha = file_sha256(split_file_reference(ref)[0]) if is_file_reference(ref) else None
    return {"name": ref, "preset": None, "options": model.construction_options(), "sha256": sha}


def warn_if_changed(ref: str, sha256: Optional[str], where: str) -> None:
    """Warn (:class:`~models.base.DGMWarning`) when the file of a file reference no longer
    has the SHA-256 recorded in ``where``."""
    if sha256 is None or not is_file_reference(ref):
        return
    path = split_file_reference(ref)[0]
    if path.is_file() and file_sha256(path) != sha256:
        warnings.warn(
            f"the model file {path} changed since {where} was written (SHA-256 {sha256[:12]}... then, "
            f"{file_sha256(path)[:12]}... now); the run's weights may not fit it",
            DGMWarning,
            stacklevel=2,
        )


# --- installed packages ---------------------------------------------------------------------
def load_plugins() -> None:
    """Register the models installed packages declare in :data:`ENTRY_POINT_GROUP` (the
    entry point's name becomes the model's name). A plugin that cannot be loaded breaks
    nothing else: why is kept in :data:`PLUGIN_ERRORS` and said when it is asked for."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:
            PLUGIN_ERRORS[ep.name] = f"importing {ep.value} failed: {type(e).__name__}: {e}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
            PLUGIN_ERRORS[ep.name] = f"{ep.value} is not a GenerativeModel subclass"
            continue
        try:
            MODELS.add(ep.name, cls)
        except DGMError as e:  # a name taken by another model
            PLUGIN_ERRORS[ep.name] = str(e)
