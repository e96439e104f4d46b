"""Neural building blocks shared by models: MLPs and observation likelihoods."""

from models.nn.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, likelihood_for
from models.nn.mlp import MLP

__all__ = ["MLP", "Likelihood", "Bernoulli", "Gaussian", "Categorical", "likelihood_for"]
