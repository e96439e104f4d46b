"""The contract every model meets.

A model is an ``nn.Module`` that carries a Pyro program and its default guide:

* ``model(x, idx=None, size=None)``: the generative program. Local latent sites and the
  observed site live inside ``self.data_plate(x, idx, size)``, a ``pyro.plate("data")``
  (an ``IndexedPlate``: the same plate without Pyro's subsample site) at ``dim=-1`` whose
  ``subsample`` is ``idx`` (dataset indices of the minibatch) and
  whose ``size`` is the dataset size, so that minibatch scaling is right and
  per-datapoint guides can index their parameters by ``idx``. Global latent sites (shared
  by all datapoints: a Bayesian layer's weights) live outside it; objectives count them
  once per step and the ``nested`` estimator draws them from the guide (``bayes_vae``).
* ``guide(x, idx=None, size=None)``: the default amortized guide (the encoder). Fully
  observed models (``fully_observed = True``: autoregressive models, flows) have no latent
  sites and an empty guide; they fit log p(x) itself, so no objective, K or guide describes
  their runs.
* ``sample(n)``: ancestral samples, shape ``[n, *event_shape]``.
* ``log_prob(x)``: exact ``log p(x)`` per datapoint in nats, only where it is exact
  (``has_exact_log_prob = True``).
* ``data_spec``: the event shape and support of the observed data; ``check_data``
  rejects bad data with a message before any training starts.

Labels. A model with ``uses_labels = True`` (class-conditional and semi-supervised models)
takes a keyword ``y`` in ``model(x, idx=None, size=None, y=None)`` and ``guide(...)``: the
int64 class labels ``[B]`` of the same rows as ``x``, where ``-1`` marks an unlabelled
datapoint (only semi-supervised models accept it). The runner then passes ``y`` to every
call of the pair (training, validation, evaluation, diagnostics) and refuses data without
labels; ``check_labels`` validates them once, before training. Models without labels are
called exactly as before, without the keyword.

Auxiliary losses. A model whose training loss has terms that are not part of its bound
(VQ-VAE's commitment loss) calls ``self.add_aux_loss(name, value)`` from its model or guide,
with ``value`` one loss per datapoint ``[B]`` (or ``[..., B]``, averaged over the leading
dims); ``self.add_metric(name, scalar)`` records a diagnostic (codebook perplexity). An
objective collects both with ``collect_aux_terms(train)`` around one evaluation of the
pair: it adds ``(N / B) * sum_b value_b`` to the training loss (weighted like the
log-likelihood terms) and logs the mean as ``aux/NAME``, but never adds it to the bound it
reports. Outside a collector both calls do nothing, so evaluation and estimators see the
plain program. State updated outside the gradient (an EMA codebook) changes only while
``self.updating``: in training mode, and not while an objective evaluates without training
(``train=False``) or only probes the program's structure. Models that call neither are
trained exactly as before.

Objectives. A model that only some objectives train correctly lists them in ``objectives``
(VQ-VAE: ``elbo`` and ``iwae``, which keep its straight-through gradient and collect its
commitment loss); ``dgm`` refuses the others with a one-line error. ``None``: any objective.

Construction. A model is built as ``cls(data_spec)``, or as ``cls(data_spec, config)`` when
it declares a ``config_class`` (a dataclass of its hyperparameters, kept as ``self.config``);
``construction_options()`` says how to build it again, so a run directory (written by the
CLI or by ``Runner(..., run_dir=...)``) can rebuild any model defined at the top level of a
file (``models.loading``). Seed before building a model to make a run reproducible:
``inference.set_seed(seed)``.

Models hold no training code. Their parameters are plain ``nn.Module`` parameters: the
runner optimises ``module.parameters()`` directly, and ``svi_pair()`` wraps the pair
for ``pyro.infer.SVI``, which finds parameters through Pyro's param store.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Iterator, List, Literal, Optional, Tuple

import pyro
import torch
from pyro.poutine.indep_messenger import IndepMessenger
from torch import Tensor, nn

Support = Literal["binary", "categorical", "real"]

DATA_PLATE = "data"
"""Name of the plate over datapoints; inference code finds per-datapoint terms by it."""


class DGMError(Exception):
    """An error a user can act on: the message says what is wrong and how to fix it."""


class NoSampler(DGMError, NotImplementedError):
    """The model has no ``sample(n)``: training, evaluation and scoring work without one;
    sample grids (``samples.png``, ``dgm sample``) need it."""


class DGMWarning(UserWarning):
    """Something a user should know that does not stop the work (``dgm`` prints it as
    ``dgm: warning: ...``): a model or data file changed since a run recorded it."""


class DataError(DGMError, ValueError):
    """Data that does not match what a model declares."""


class IndexedPlate(pyro.plate):
    """``pyro.plate(name, size, subsample=subsample, dim=dim)`` without Pyro's subsample site.

    Built, ``pyro.plate`` sends a ``_Subsample`` sample site through the handler stack (a
    distribution, a tensor and a message), so that a guide that draws random indices can
    replay them into the model. A plate given its indices (the data plate gets the
    minibatch's ``idx``; the particle plate never subsamples) has no use for that site,
    and built in the guide and the model at every step, with the particle plate, it cost
    about 2 % of a training step of the benchmark VAE (``benchmarks/svi_step.py``). Sites
    see the same frame (``size`` the number of indices, ``full_size`` the plate's size),
    the same minibatch scale ``size / len(subsample)``, the same broadcast, and ``with``
    gives the indices (``arange(size)`` without a subsample), as ``pyro.plate`` does; it is
    a ``pyro.plate``, so Pyro's autoguides accept it from ``create_plates``.
    """

    def __init__(self, name: str, size: int, dim: int, subsample: Optional[Tensor] = None, device=None):
        IndepMessenger.__init__(self, name, size, dim, device)  # skips SubsampleMessenger's site
        self.subsample_size = size if subsample is None else len(subsample)
        self._indices = subsample

    def __enter__(self) -> Optional[Tensor]:  # type: ignore[override]
        super().__enter__()
        return self.indices if self._vectorized else None


@dataclass(frozen=True)
class DataSpec:
    """What observed data looks like: per-datapoint ``event_shape`` and its support.

    ``image_shape`` (``(H, W)`` or ``(C, H, W)``) is only for drawing samples.
    """

    event_shape: Tuple[int, ...]
    support: Support
    num_levels: Optional[int] = None
    image_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        shape = self.event_shape
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
        ):
            raise DataError(f"event_shape must be a tuple of positive integers, got {shape!r}")
        object.__setattr__(self, "event_shape", tuple(shape))
        if self.support not in ("binary", "categorical", "real"):
            raise DataError(f"unknown support {self.support!r}; use binary, categorical or real")
        if self.support == "categorical" and (self.num_levels is None or self.num_levels < 2):
            raise DataError("categorical data needs num_levels >= 2")

    @property
    def dim(self) -> int:
        n = 1
        for s in self.event_shape:
            n *= s
        return n

    def to_json(self) -> dict:
        return {
            "event_shape": list(self.event_shape),
            "support": self.support,
            "num_levels": self.num_levels,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
        }

    @staticmethod
    def from_json(d: dict) -> "DataSpec":
        image = d.get("image_shape")
        return DataSpec(
            tuple(int(s) for s in d["event_shape"]),
            d["support"],
            d.get("num_levels"),
            None if image is None else tuple(int(s) for s in image),
        )

    def placeholder(self, n: int) -> Tensor:
        """``n`` all-zero datapoints (in every support): the shape of a dataset, for building
        parts that are sized on data (guides) without the data itself."""
        return torch.zeros((n,) + tuple(self.event_shape))

    def describe(self) -> str:
        levels = f" with {self.num_levels} levels" if self.support == "categorical" else ""
        return f"{self.support}{levels} data of event shape {tuple(self.event_shape)}"

    def check(self, x: Tensor, what: str = "data") -> None:
        """Raise ``DataError`` unless ``x`` is a batch ``[N, *event_shape]`` in the support."""
        expected = self.describe()
        if not isinstance(x, Tensor):
            raise DataError(f"{what}: expected a torch.Tensor of {expected}, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.event_shape) or x.dim() != len(self.event_shape) + 1:
            raise DataError(
                f"{what}: expected shape [N, {', '.join(map(str, self.event_shape))}] ({expected}), got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{what}: empty dataset")
        if not x.is_floating_point():
            raise DataError(f"{what}: expected a floating-point tensor, got {x.dtype}; use x.float()")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"{what}: {bad} NaN or infinite values; clean the data first")
        if self.support == "binary":
            if not ((x == 0) | (x == 1)).all():
                lo, hi = float(x.min()), float(x.max())
                raise DataError(
                    f"{what}: a Bernoulli model needs values in {{0, 1}}, found values in "
                    f"[{lo:g}, {hi:g}]; binarize the data (e.g. --binarization dynamic)"
                )
        elif self.support == "categorical":
            k = self.num_levels
            if not ((x == x.round()) & (x >= 0) & (x <= k - 1)).all():
                raise DataError(f"{what}: expected integer levels 0..{k - 1} ({expected})")


@dataclass
class AuxTerms:
    """What one evaluation of a model/guide pair adds besides its log-densities: per-datapoint
    auxiliary ``losses`` (``[..., B]``) and scalar ``metrics``; ``train`` says whether the
    evaluation is a training step (state outside the gradient may then change)."""

    train: bool
    losses: Dict[str, Tensor] = field(default_factory=dict)
    metrics: Dict[str, Tensor] = field(default_factory=dict)


_AUX_COLLECTORS: List[AuxTerms] = []


@contextmanager
def collect_aux_terms(train: bool = True) -> Iterator[AuxTerms]:
    """Collect the ``add_aux_loss`` / ``add_metric`` calls of the models run inside (the
    innermost collector gets them; ``train=False`` also stops their state updates)."""
    terms = AuxTerms(train)
    _AUX_COLLECTORS.append(terms)
    try:
        yield terms
    finally:
        _AUX_COLLECTORS.pop()


def _checked_sample(sample: Callable) -> Callable:
    """``sample`` refusing a number of samples that is not a positive integer."""

    @functools.wraps(sample)
    def checked(self, n, *args, **kwargs):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"the number of samples must be a positive integer, got {n!r}")
        return sample(self, n, *args, **kwargs)

    return checked


class GenerativeModel(nn.Module):
    """Base class of every model: a Pyro model/guide pair plus sampling and data checks.

    Every subclass's ``sample(n, ...)`` refuses an ``n`` that is not a positive integer
    (checked here, once, for all models)."""

    name: ClassVar[str] = "model"
    has_exact_log_prob: ClassVar[bool] = False
    fully_observed: ClassVar[bool] = False  # no latent sites: trained on log p(x) itself, by any objective
    max_plate_nesting: ClassVar[int] = 1
    config_class: ClassVar[Optional[type]] = None  # dataclass of hyperparameters
    presets: ClassVar[dict] = {}  # name -> config_class instance
    uses_labels: ClassVar[bool] = False  # model/guide take the keyword y (class labels)
    accepts_unlabelled: ClassVar[bool] = False  # y may mark unlabelled rows with -1 (semi-supervised)
    objectives: ClassVar[Optional[Tuple[str, ...]]] = None  # the objectives that train it correctly (None: all)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "sample" in cls.__dict__:
            cls.sample = _checked_sample(cls.__dict__["sample"])

    def __init__(self, data_spec: DataSpec) -> None:
        super().__init__()
        self.data_spec = data_spec

    # --- the Pyro program -------------------------------------------------------------
    def model(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        raise NotImplementedError

    def guide(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        """Default guide: none (fully observed models have no latent sites)."""
        return None

    def data_plate(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        """The plate over datapoints. ``idx`` are dataset indices, ``size`` the dataset size."""
        batch = x.shape[0]
        if idx is None:
            if size is not None and size != batch:
                raise DGMError("a minibatch (size != batch) needs its dataset indices idx")
            return IndexedPlate(DATA_PLATE, batch, dim=-1, device=x.device)
        return IndexedPlate(DATA_PLATE, size if size is not None else batch, dim=-1, subsample=idx)

    # --- everything else ---------------------------------------------------------------
    def sample(self, n: int) -> Tensor:
        """Ancestral samples ``[n, *event_shape]``."""
        raise NoSampler(
            f"{type(self).__name__} does not implement sample(n) (ancestral samples [n, *event_shape]); "
            "write one to get samples.png and `dgm sample`"
        )

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) per datapoint, in nats (only where ``has_exact_log_prob``)."""
        raise DGMError(
            f"{type(self).__name__} has no exact log p(x); use an estimator (--estimator is or naive) instead"
        )

    def check_data(self, x: Tensor, what: str = "data") -> None:
        """Raise ``DataError`` unless ``x`` fits ``data_spec`` and the dtype of the parameters."""
        self.data_spec.check(x, what)
        if x.dtype != self.dtype:
            raise DataError(
                f"{what} is {x.dtype} but {type(self).__name__}'s parameters are {self.dtype}; "
                f"convert one of them (x.to({self.dtype}) or model.to({x.dtype}))"
            )

    def construction_options(self) -> Dict[str, object]:
        """The options that rebuild this model with the same architecture (what a run
        directory records): the fields of ``self.config`` that differ from a default
        ``config_class()`` (a model with a ``config_class`` keeps its config as
        ``self.config``); ``{}`` for a model without one, which is rebuilt as
        ``cls(data_spec)``."""
        if self.config_class is None:
            return {}
        config, default = self.config, self.config_class()
        names = [f for f in default.__dataclass_fields__]
        return {n: getattr(config, n) for n in names if getattr(config, n) != getattr(default, n)}

    def report(self, x: Tensor, labels: Optional[Tensor] = None) -> Dict[str, float]:
        """Metrics of this kind of model on the test data ``x`` (with its ``labels`` where the
        data has them) for the run summary, beyond log p(x) (M2: its classifier's accuracy).
        Default: none."""
        return {}

    def after_fit(self, train: Tensor) -> None:
        """Called by the runner once training ends, on the final (best-validation) weights,
        with the training data: state that is not learned by gradient but computed from the
        data goes here (a flow's batch-norm statistics). Default: nothing."""

    # --- auxiliary training terms (see the module docstring) ------------------------------
    def add_aux_loss(self, name: str, value: Tensor) -> None:
        """Add the per-datapoint loss ``value`` ``[..., B]`` to the training loss of the
        objective evaluating this model (never to its bound); no-op outside a collector."""
        if _AUX_COLLECTORS:
            losses = _AUX_COLLECTORS[-1].losses
            losses[name] = losses[name] + value if name in losses else value

    def add_metric(self, name: str, value: Tensor) -> None:
        """Record a scalar diagnostic ``value`` under ``name`` (no-op outside a collector)."""
        if _AUX_COLLECTORS:
            _AUX_COLLECTORS[-1].metrics[name] = value.detach()

    @property
    def updating(self) -> bool:
        """Whether a forward pass may update state outside the gradient (EMA buffers)."""
        return self.training and (not _AUX_COLLECTORS or _AUX_COLLECTORS[-1].train)

    def check_labels(self, y: Tensor, num_rows: int, what: str = "labels") -> None:
        """Raise ``DataError`` unless ``y`` is an int64 vector of ``num_rows`` labels
        (models with labels refine this with their classes)."""
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (num_rows,):
            got = f"{y.dtype} {list(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise DataError(f"{what}: expected int64 class labels of shape [{num_rows}], got {got}")

    def svi_pair(self, name: Optional[str] = None) -> Tuple[Callable, Callable]:
        """``(model, guide)`` callables that register this module with Pyro's param store,
        for use with ``pyro.infer.SVI`` and Pyro's own ELBOs."""
        key = name or self.name

        def model(*args, **kwargs):
            pyro.module(key, self)
            return self.model(*args, **kwargs)

        def guide(*args, **kwargs):
            pyro.module(key, self)
            return self.guide(*args, **kwargs)

        return model, guide

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the parameters (and buffers); the default without any."""
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")
