"""Generative models: each a Pyro model/guide pair with no training code.

``MODELS`` (``models.registry``) maps the names the ``dgm`` command accepts to model classes;
each model file registers its class with ``@register_model``, and importing this package
imports them all. Each class has a ``config_class`` (a dataclass of its hyperparameters) and
``presets`` (named configs). Installed packages add models through the entry-point group
``pyro_dgm.models``; ``resolve_model`` also takes ``path/to/file.py:ClassName``
(``models.loading``).
"""

from models.autoregressive.charrnn import CharRNN, CharRNNConfig
from models.autoregressive.fvsbn import FVSBN, FVSBNConfig
from models.autoregressive.gated_pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from models.autoregressive.made import MADE, MADEConfig
from models.autoregressive.nade import NADE, NADEConfig
from models.autoregressive.pixelcnn import PixelCNN, PixelCNNConfig
from models.autoregressive.rnade import RNADE, RNADEConfig
from models.autoregressive.transformer import Transformer, TransformerConfig
from models.autoregressive.wavenet import WaveNet, WaveNetConfig
from models.base import DataError, DataSpec, DGMError, GenerativeModel
from models.flows import MAF, NICE, RealNVP
from models.latent.ar_vae import ARVAE
from models.latent.bayes_vae import BayesVAE, BayesVAEConfig
from models.latent.bernoulli_mixture import BernoulliMixture, BernoulliMixtureConfig
from models.latent.cvae import CVAE, CVAEConfig
from models.latent.gaussian_mixture import GaussianMixture, GaussianMixtureConfig
from models.latent.m2 import M2, M2Config
from models.latent.ppca import PPCA, PPCAConfig
from models.latent.sbn import SBN, SBNConfig
from models.latent.vae import VAE, VAEConfig
from models.latent.vae2 import VAE2, VAE2Config
from models.latent.vqvae import VQVAE, VQVAEConfig
from models.loading import load_plugins, resolve_model  # noqa: E402
from models.registry import MODELS, register_model  # noqa: E402  (filled by the imports above)

load_plugins()  # the models installed packages declare (entry-point group pyro_dgm.models)

__all__ = [
    "MODELS",
    "register_model",
    "resolve_model",
    "ARVAE",
    "BayesVAE",
    "BayesVAEConfig",
    "MAF",
    "NICE",
    "RealNVP",
    "GenerativeModel",
    "DataSpec",
    "DGMError",
    "DataError",
    "VAE",
    "VAEConfig",
    "VAE2",
    "VAE2Config",
    "PPCA",
    "PPCAConfig",
    "FVSBN",
    "FVSBNConfig",
    "NADE",
    "NADEConfig",
    "MADE",
    "MADEConfig",
    "RNADE",
    "RNADEConfig",
    "CharRNN",
    "CharRNNConfig",
    "Transformer",
    "TransformerConfig",
    "WaveNet",
    "WaveNetConfig",
    "PixelCNN",
    "PixelCNNConfig",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "SBN",
    "SBNConfig",
    "BernoulliMixture",
    "BernoulliMixtureConfig",
    "GaussianMixture",
    "GaussianMixtureConfig",
    "CVAE",
    "CVAEConfig",
    "M2",
    "M2Config",
    "VQVAE",
    "VQVAEConfig",
]
