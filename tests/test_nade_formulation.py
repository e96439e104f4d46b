"""NADE's fused tied-weight layer (``TiedSigmoidLayer``) against the formulation it replaced
(``benchmarks.nade.reference_logits``: einsum, exclusive cumsum, cat, sigmoid, einsum, all
differentiated by autograd): the same log-likelihoods and the same gradients of every parameter
and of the input features, on random data with random weights, for binary and categorical data,
through the CPU loop and through the ``cumsum`` path used on other devices; the graph-free
evaluation pass gives the same values; the hand-written backward passes ``gradcheck``."""

import pytest
import torch

from benchmarks.nade import ReferenceNADE, reference_copy
from models.autoregressive import base as base_module
from models.autoregressive import nade as nade_module
from models.autoregressive.base import tied_preactivations
from models.autoregressive.nade import NADE, NADEConfig, TiedSigmoidLayer
from models.base import DataSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = {
    "binary": (DataSpec((4, 5), "binary"), 2),
    "categorical": (DataSpec((7,), "categorical", num_levels=4), 4),
}


def random_nade(name, hidden=6):
    spec, k = SPECS[name]
    torch.manual_seed(1)
    m = NADE(spec, NADEConfig(hidden=hidden))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0)
    x = torch.randint(0, k, (13,) + tuple(spec.event_shape)).to(torch.get_default_dtype())
    return m, x


def log_px_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    lp = model.log_prob(x)
    (lp * torch.linspace(0.5, 2.0, lp.shape[0])).sum().backward()  # unequal weights per datapoint
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


@pytest.mark.parametrize("sequential", [True, False], ids=["cpu-loop", "cumsum"])
@pytest.mark.parametrize("name", list(SPECS))
def test_same_log_likelihood_and_parameter_gradients_as_the_reference(float64, monkeypatch, name, sequential):
    monkeypatch.setattr(nade_module, "_sequential", lambda t: sequential)
    m, x = random_nade(name)
    ref = reference_copy(m)
    assert isinstance(ref, ReferenceNADE)
    lp, grads = log_px_and_grads(m, x)
    lp_ref, grads_ref = log_px_and_grads(ref, x)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    assert grads.keys() == grads_ref.keys() == {"W", "c", "V", "b"}
    for n in grads:
        assert grads_ref[n].abs().max() > 1e-3  # every parameter matters here
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("sequential", [True, False], ids=["cpu-loop", "cumsum"])
@pytest.mark.parametrize("name", list(SPECS))
def test_same_gradient_in_the_input_features(float64, monkeypatch, name, sequential):
    """The relaxed one-hot path: logits are differentiated in the features themselves."""
    monkeypatch.setattr(nade_module, "_sequential", lambda t: sequential)
    m, x = random_nade(name)
    ref = reference_copy(m)
    features = m.input_features(x).detach()
    features = (features + 0.1 * torch.rand_like(features)).requires_grad_(True)  # not one-hot: every column counts
    w = torch.randn(features.shape)
    (g,) = torch.autograd.grad((m.conditional_logits(features) * w).sum(), features)
    (g_ref,) = torch.autograd.grad((ref.conditional_logits(features) * w).sum(), features)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert (g[:, -1] == 0).all() and (g[:, :-1].abs() > 0).any()  # the last input feeds no conditional


@pytest.mark.parametrize("name", list(SPECS))
def test_evaluation_without_a_graph_gives_the_same_values(float64, name):
    m, x = random_nade(name)
    with torch.no_grad():
        lp_eval = m.log_prob(x)
    lp_train, _ = log_px_and_grads(m, x)
    torch.testing.assert_close(lp_eval, lp_train, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sequential", [True, False], ids=["cpu-loop", "cumsum"])
def test_hand_written_backward_passes_gradcheck(float64, monkeypatch, k, sequential):
    monkeypatch.setattr(nade_module, "_sequential", lambda t: sequential)
    b, d, h = 3, 5, 4
    torch.manual_seed(0)
    args = [torch.randn(shape, requires_grad=True) for shape in ((b, d, k), (d, k, h), (h,), (d, k, h), (d, k))]
    assert torch.autograd.gradcheck(TiedSigmoidLayer.apply, args)


# --- the exclusive cumulative sum of RNADE (autoregressive.base.tied_preactivations) -----------------


def reference_preactivations(contrib, c):
    """``tied_preactivations`` as it was: ``cumsum`` and ``cat`` under autograd."""
    before = torch.cumsum(contrib[:, :-1], dim=1)
    return c + torch.cat([torch.zeros_like(contrib[:, :1]), before], dim=1)


@pytest.mark.parametrize("sequential", [True, False], ids=["cpu-loop", "cumsum"])
def test_tied_preactivations_equal_the_cumsum_formulation_with_gradients(float64, monkeypatch, sequential):
    monkeypatch.setattr(base_module, "_sequential", lambda t: sequential)
    torch.manual_seed(0)
    contrib, c = torch.randn(4, 7, 5, requires_grad=True), torch.randn(5, requires_grad=True)
    a = tied_preactivations(contrib, c)
    a_ref = reference_preactivations(contrib, c)
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-12)
    w = torch.randn(a.shape)
    grads = torch.autograd.grad((a * w).sum(), (contrib, c))
    grads_ref = torch.autograd.grad((a_ref * w).sum(), (contrib, c))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert (grads[0][:, -1] == 0).all()  # the last contribution feeds no hidden state
    assert torch.autograd.gradcheck(tied_preactivations, (contrib, c))
