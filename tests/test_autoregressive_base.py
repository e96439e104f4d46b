"""The autoregressive family's shared pieces: the Pyro site wrapper and the mask builders."""

import pytest
import torch
from torch import nn

from inference import ELBO, IWAE, estimate_dataset
from models.autoregressive.base import AutoregressiveDistribution, AutoregressiveModel
from models.base import DataSpec
from models.nn.masked import MaskedLinear, connectivity_mask, hidden_degrees, order_degrees


class IndependentBits(AutoregressiveModel):
    """The trivial autoregressive model: p(x_i | x_<i) = p(x_i)."""

    def __init__(self, dim):
        super().__init__(DataSpec((dim,), "binary"))
        self.logits = nn.Parameter(torch.linspace(-1, 1, dim))

    def conditional_log_probs(self, x):
        return -nn.functional.binary_cross_entropy_with_logits(self.logits.expand_as(x), x, reduction="none")

    def sample(self, n):
        return torch.bernoulli(torch.sigmoid(self.logits).expand(n, -1))


@pytest.mark.parametrize("k", [1, 7])
def test_objectives_are_exact_for_fully_observed_models(k):
    m = IndependentBits(5)
    x = torch.bernoulli(torch.full((6, 5), 0.4))
    exact = m.log_prob(x).sum()
    torch.testing.assert_close(ELBO(k).differentiable_loss(m.model, m.guide, x), -exact)
    scaled = IWAE(k).differentiable_loss(m.model, m.guide, x, torch.arange(6), 30)
    torch.testing.assert_close(scaled, -5 * exact)  # N / B = 5
    est = estimate_dataset(m, x, method="is", num_samples=k, progress=False)
    torch.testing.assert_close(est.log_px, m.log_prob(x).detach().double())  # zero-variance weights


def test_distribution_wrapper_broadcasts_under_plates_and_samples():
    m = IndependentBits(3)
    d = AutoregressiveDistribution(m).expand((4, 2))
    assert d.batch_shape == (4, 2) and d.event_shape == (3,)
    assert d.sample().shape == (4, 2, 3)
    x = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert d.log_prob(x).shape == (4, 2)
    torch.testing.assert_close(d.log_prob(x)[0], m.log_prob(x))


def test_connectivity_mask_and_degrees():
    order = torch.tensor([2, 0, 1])  # generate x2 first, then x0, then x1
    deg = order_degrees(order)
    assert deg.tolist() == [2, 3, 1]
    strict = connectivity_mask(deg, deg, strict=True)  # output i may see input j iff deg[j] < deg[i]
    assert strict.tolist() == [[0, 0, 1], [1, 0, 1], [0, 0, 0]]
    assert connectivity_mask(deg, deg, strict=False).diagonal().tolist() == [1, 1, 1]
    g = torch.Generator().manual_seed(0)
    for layer in hidden_degrees([50, 40], 6, generator=g):
        assert layer.min() >= 1 and layer.max() <= 5
    layers = hidden_degrees([50, 40], 6, generator=g)
    assert layers[1].min() >= layers[0].min()  # no dead units: every unit has some input


def test_masked_linear_masks_outputs_and_gradients():
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    layer = MaskedLinear(2, 3, mask)
    x = torch.randn(4, 2, requires_grad=True)
    layer(x).sum().backward()
    assert (layer.weight.grad[mask == 0] == 0).all()
    assert (layer.weight.grad[mask == 1] != 0).all()
    torch.testing.assert_close(layer(x), x @ (mask * layer.weight).T + layer.bias)
    assert "mask" in layer.state_dict()
