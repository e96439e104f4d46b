"""Pyro's automatic guides behind the one guide interface: ``auto-normal``,
``auto-lowrank-mvn`` and ``auto-iaf`` for any model with continuous latent sites.

* ``auto-normal``: Pyro's ``AutoNormal``, a mean-field Gaussian in the unconstrained space
  of every latent site, ``z = T(u)``, ``u ~ N(loc, diag(scale^2))``, ``T = biject_to(support)``,
  so ``log q(z) = log N(u) - log |det dT/du|``. Its parameters of a site inside the data
  plate are per datapoint: ``AutoNormal`` builds them at the plate's full size N and Pyro
  indexes them by the plate's ``subsample`` (the minibatch's dataset indices ``idx``, the
  model contract's ``pyro.plate("data", N, subsample=idx)``), so minibatch training is the
  local guide's (``inference.guides.LocalGuide``) with Pyro's parametrization. Sites
  outside the data plate (global latents) get one set of parameters.
* ``auto-lowrank-mvn``, ``auto-iaf``: Pyro's ``AutoLowRankMultivariateNormal`` (``N(loc, W
  W^T + diag(d))`` of rank ``sqrt(dim)``) and ``AutoIAFNormal`` (a standard normal pushed
  through ``--flow-depth`` inverse autoregressive flows of hidden width ``--flow-hidden``)
  over the **global** latent sites, jointly. These ``AutoContinuous`` guides draw one
  vector of all the sites they cover and so cannot be indexed by datapoint under a
  subsampled plate (Pyro supports no subsampling there): the local sites of the same model
  get ``AutoNormal``'s per-datapoint parameters (one ``AutoGuideList``). A model without
  global latent sites is refused (use ``auto-normal``, or ``iaf``, the flow on the encoder).

Every guide site's density enters the log-weights as Pyro's ELBOs count it: the auxiliary
sites (``z_unconstrained``, the joint latent vector) with their log-density, the model's
sites as ``Delta`` sites carrying the log-Jacobian (``inference.logweights``).

Held-out data: a guide with local sites declares ``refit_on_new_data``; ``for_data`` builds
the same guide on the new rows, copies the global sites' parameters (the trained q(theta))
and fits the local ones with the model and q(theta) frozen (``refit_epochs`` epochs of the
ELBO at Adam's rate ``max(--lr, REFIT_LR)``), as the local guide does. Sites a guide cannot
handle (discrete supports; supports without a bijection to R^n, e.g. a
``MixtureSameFamily``'s) are refused in one line naming the site, its distribution and the
guide to use instead.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import List, Optional, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuideList, AutoIAFNormal, AutoLowRankMultivariateNormal, AutoNormal
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import biject_to

from inference.config import GuideConfig, TrainConfig
from inference.guides import GUIDES, Guide, site_error
from models.base import DATA_PLATE, DGMError, GenerativeModel, collect_aux_terms

__all__ = ["PyroAutoGuide", "AUTOGUIDES"]

AUTOGUIDES = {
    "auto-normal": "Pyro's AutoNormal: mean-field Gaussian per site, per-datapoint parameters under the data plate",
    "auto-lowrank-mvn": "Pyro's AutoLowRankMultivariateNormal over the global latents (AutoNormal for local ones)",
    "auto-iaf": "Pyro's AutoIAFNormal over the global latents (AutoNormal for local ones)",
}
REFIT_LR = 0.05
"""Adam's rate (at least) when fitting held-out per-datapoint parameters: each is updated once
an epoch, with the model and q(theta) frozen, so the training run's rate for shared networks
is far too small for them."""
MAX_IAF_DIM = 2000  # AutoIAFNormal's MADE has ~6 dim^2 weights at its default width
_names = itertools.count()


def _split_sites(kind: str, model: GenerativeModel, x: Tensor) -> Tuple[List[str], List[str], int]:
    """``(global, local)`` latent site names of ``model``, traced on two rows of ``x``, and
    the unconstrained size of the global ones; refuses the sites ``kind`` cannot handle."""
    n = x.shape[0]
    rows = x[: min(2, n)]
    with poutine.block(), torch.no_grad(), collect_aux_terms(train=False):
        trace = poutine.trace(model.model).get_trace(rows, torch.arange(rows.shape[0], device=x.device), n)
    global_sites, local_sites, global_dim = [], [], 0
    for name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise site_error(kind, name, fn, f"discrete support {fn.support}", "--guide amortized or local")
        try:
            unconstrained = biject_to(fn.support).inv(site["value"])
        except NotImplementedError:
            raise site_error(
                kind, name, fn, f"support {fn.support} has no bijection to R^n", "--guide local or amortized"
            ) from None
        if any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
            local_sites.append(name)
        else:
            global_sites.append(name)
            global_dim += unconstrained.numel()
    if not global_sites and not local_sites:
        raise DGMError(f"{type(model).__name__} has no latent sites: it needs no guide")
    return global_sites, local_sites, global_dim


class PyroAutoGuide(Guide):
    """One of Pyro's autoguides (module docstring) for ``model``, sized on ``data``."""

    def __init__(self, kind: str, model: GenerativeModel, data: Tensor, config: GuideConfig):
        super().__init__()
        if kind not in AUTOGUIDES:
            raise DGMError(f"unknown autoguide {kind!r}; choose from {', '.join(AUTOGUIDES)}")
        self.kind, self.settings = kind, config
        self.num_data = data.shape[0]
        self.global_sites, self.local_sites, self.global_dim = _split_sites(kind, model, data)
        self.refit_on_new_data = bool(self.local_sites)  # per-datapoint parameters belong to `data`
        with pyro.settings.context(module_local_params=True):  # built, like called, with its own parameters
            self.auto = self._build(model, data)
        self.auto._pyro_name = f"{kind}-{next(_names)}"  # its own names, never another guide's
        with poutine.block(), torch.no_grad(), collect_aux_terms(train=False):  # create the parameters now
            self(data[: min(2, self.num_data)], torch.arange(min(2, self.num_data), device=data.device), self.num_data)

    def _build(self, model: GenerativeModel, data: Tensor):
        program, plates = model.model, model.data_plate
        if self.kind == "auto-normal":
            return AutoNormal(program, create_plates=plates)
        if not self.global_sites:
            raise DGMError(
                f"{self.kind} covers global latent sites only and {type(model).__name__} has none (its latent "
                f"sites {', '.join(self.local_sites)} are inside the 'data' plate, which Pyro's joint guides cannot "
                "subsample by datapoint); use --guide auto-normal (per-datapoint) or iaf (a flow on the encoder)"
            )
        joint_model = poutine.block(program, expose=self.global_sites)
        if self.kind == "auto-lowrank-mvn":
            joint = AutoLowRankMultivariateNormal(joint_model)
        else:
            dim = self.global_dim
            if dim > MAX_IAF_DIM:
                raise DGMError(
                    f"auto-iaf over {dim} global latent dimensions ({', '.join(self.global_sites)}) needs ~6 dim^2 "
                    f"flow weights; use --guide auto-lowrank-mvn or auto-normal (at most {MAX_IAF_DIM} for auto-iaf)"
                )
            hidden = [self.settings.flow_hidden] if self.settings.flow_hidden else None
            joint = AutoIAFNormal(joint_model, hidden_dim=hidden, num_transforms=self.settings.flow_depth)
        parts = AutoGuideList(program, create_plates=plates)
        parts.append(joint)
        if self.local_sites:
            parts.append(AutoNormal(poutine.block(program, hide=self.global_sites)))
        return parts

    def forward(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None, **kwargs):
        with pyro.settings.context(module_local_params=True):  # parameters of this module, not the param store
            if idx is not None and len(idx) == (size or x.shape[0]) and len(idx) > 1:
                with _FullBatchRows(idx, self.local_sites):
                    return self.auto(x, idx, size, **kwargs)
            return self.auto(x, idx, size, **kwargs)

    def describe(self) -> str:
        return self.kind

    # --- held-out data ------------------------------------------------------------------
    def for_data(self, model: GenerativeModel, x: Tensor, *, num_particles: int = 1, train=None) -> "Guide":
        """This guide on ``x``: q(theta) copied and frozen, the per-datapoint parameters
        fitted with the model frozen (module docstring); itself without local sites."""
        if not self.refit_on_new_data:
            return self
        from inference.runner import fit_local_guide  # the runner fits guides: import at use

        fresh = PyroAutoGuide(self.kind, model, x, self.settings)
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, p in fresh.named_parameters():
                if name in own and own[name].shape == p.shape and not _is_local(name, self.local_sites):
                    p.copy_(own[name])
                    p.requires_grad_(False)
        train = train or TrainConfig()
        refit = replace(train, lr=max(train.lr, REFIT_LR))  # only per-datapoint parameters move here
        return fit_local_guide(model, x, num_particles, refit, epochs=self.settings.refit_epochs, guide=fresh)


class _FullBatchRows(Messenger):
    """Pyro indexes a plate's parameters by its ``subsample`` only when the subsample is
    smaller than the plate: a batch of all N rows in shuffled order (an epoch of one
    batch, as in a refit on a small held-out set) would pair row ``i`` of the batch with
    the parameters of datapoint ``i``. Index the local sites' parameters by ``idx`` there
    too (the data plate sits at dim -1, left of the parameter's ``event_dim``)."""

    def __init__(self, idx: Tensor, local_sites: List[str]):
        super().__init__()
        self.idx, self.local_sites = idx, set(local_sites)

    def _postprocess_message(self, msg) -> None:
        if msg["type"] != "param" or msg["kwargs"].get("event_dim") is None:
            return
        parts = msg["name"].split(".")
        if len(parts) >= 2 and parts[-2] in ("locs", "scales") and parts[-1] in self.local_sites:
            value = msg["value"]
            if value.shape[-1 - msg["kwargs"]["event_dim"]] == len(self.idx):
                msg["value"] = value.index_select(-1 - msg["kwargs"]["event_dim"], self.idx)


def _is_local(param_name: str, local_sites: List[str]) -> bool:
    """Whether an ``AutoNormal`` parameter (``...locs.SITE`` / ``...scales.SITE``) belongs to a
    local site, i.e. is per datapoint."""
    parts = param_name.split(".")
    return len(parts) >= 2 and parts[-2] in ("locs", "scales") and parts[-1] in local_sites


def _factory(kind: str):
    def build(config: GuideConfig, model: GenerativeModel, data: Tensor) -> PyroAutoGuide:
        return PyroAutoGuide(kind, model, data, config)

    build.__doc__ = AUTOGUIDES[kind]
    return build


for _kind, _what in AUTOGUIDES.items():
    GUIDES.add(_kind, _factory(_kind), _what)
