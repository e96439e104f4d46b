"""Completion (``sample(n, given)``) draws exactly from p(x_unknown | x_known).

For a tiny event the conditional is computed by enumeration from ``log_prob`` and compared
with the empirical frequencies of many completions; the known positions must come back
unchanged, and a ``given`` whose known positions do not precede the unknown ones in the
generation order is refused.
"""

import itertools

import pytest
import torch

from models.autoregressive.fvsbn import FVSBN, FVSBNConfig
from models.autoregressive.made import MADE, MADEConfig
from models.autoregressive.nade import NADE, NADEConfig
from models.base import DataSpec, DGMError

pytestmark = pytest.mark.usefixtures("one_thread")

D = 5  # 2 known + 3 drawn
KNOWN = torch.tensor([1.0, 0.0])


def randomize_(model, scale=2.5):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model.eval()


MODELS = {
    "fvsbn": lambda: FVSBN(DataSpec((D,), "binary")),
    "nade": lambda: NADE(DataSpec((D,), "binary"), NADEConfig(hidden=6)),
    "made-ensemble": lambda: MADE(
        DataSpec((D,), "binary"),
        MADEConfig(hidden=(12,), num_masks=3, connectivity_agnostic=True, ensemble=3),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_completions_follow_the_exact_conditional(float64, name):
    torch.manual_seed(0)
    model = randomize_(MODELS[name]())
    n = 60_000
    given = torch.full((n, D), float("nan"))
    given[:, :2] = KNOWN
    x = model.sample(n, given=given, generator=torch.Generator().manual_seed(0))
    assert (x[:, :2] == KNOWN).all()
    rest = torch.tensor(list(itertools.product((0.0, 1.0), repeat=D - 2)))
    full = torch.cat([KNOWN.expand(len(rest), 2), rest], -1)
    with torch.no_grad():
        p = torch.softmax(model.log_prob(full), 0)  # p(x_unknown | x_known) by enumeration
    cells = (x[:, 2:] * torch.tensor([4.0, 2.0, 1.0])).sum(-1).long()
    freq = torch.bincount(cells, minlength=8) / n
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 5 * stderr + 1e-4).all(), (freq, p)
    # the unconditional marginal differs, so a sampler ignoring `given` would fail above
    with torch.no_grad():
        all_x = torch.tensor(list(itertools.product((0.0, 1.0), repeat=D)))
        marginal = model.log_prob(all_x).exp().reshape(4, 8).sum(0)
    assert (marginal - p).abs().max() > 0.02


def test_made_ensemble_member_posterior_matters(float64):
    """Picking ensemble members uniformly (ignoring p(m | x_known)) would be detectably wrong
    for this model: the exact conditional differs from the uniform mixture of the members'
    conditionals."""
    torch.manual_seed(0)
    model = randomize_(MODELS["made-ensemble"]())
    rest = torch.tensor(list(itertools.product((0.0, 1.0), repeat=D - 2)))
    full = torch.cat([KNOWN.expand(len(rest), 2), rest], -1)
    with torch.no_grad():
        exact = torch.softmax(model.log_prob(full), 0)
        members = [torch.softmax(model.conditional_log_probs(full, m).sum(-1), 0) for m in range(3)]
    uniform = torch.stack(members).mean(0)
    assert (exact - uniform).abs().max() > 0.1


def test_given_must_precede_the_unknown_positions_in_the_order():
    model = FVSBN(DataSpec((D,), "binary"), FVSBNConfig(order_seed=0))  # a random order
    order = model.order.tolist()
    given = torch.full((4, D), float("nan"))
    given[:, order[-1]] = 1.0  # the last position in the order is known
    with pytest.raises(DGMError, match="before every unknown"):
        model.sample(4, given=given)
    given = torch.full((4, D), float("nan"))
    given[:, order[0]] = 1.0  # the first is fine
    assert (model.sample(4, given=given)[:, order[0]] == 1).all()


def test_given_with_the_wrong_shape_is_refused():
    model = NADE(DataSpec((D,), "binary"), NADEConfig(hidden=4))
    with pytest.raises(DGMError, match="shape"):
        model.sample(3, given=torch.zeros(2, D))
