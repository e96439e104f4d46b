"""Generative models: each a Pyro model/guide pair with no training code.

``REGISTRY`` maps the names the ``dgm`` command accepts to model classes. Each class has a
``config_class`` (a dataclass of its hyperparameters) and ``presets`` (named configs).
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
from models.latent.bernoulli_mixture import BernoulliMixture, BernoulliMixtureConfig
from models.latent.gaussian_mixture import GaussianMixture, GaussianMixtureConfig
from models.latent.ppca import PPCA, PPCAConfig
from models.latent.sbn import SBN, SBNConfig
from models.latent.vae import VAE, VAEConfig

REGISTRY = {
    "vae": VAE,
    "ppca": PPCA,
    "fvsbn": FVSBN,
    "nade": NADE,
    "made": MADE,
    "rnade": RNADE,
    "charrnn": CharRNN,
    "transformer": Transformer,
    "pixelcnn": PixelCNN,
    "gated_pixelcnn": GatedPixelCNN,
    "wavenet": WaveNet,
    "nice": NICE,
    "realnvp": RealNVP,
    "maf": MAF,
    "sbn": SBN,
    "bernoulli_mixture": BernoulliMixture,
    "gaussian_mixture": GaussianMixture,
}

__all__ = [
    "REGISTRY",
    "GenerativeModel",
    "DataSpec",
    "DGMError",
    "DataError",
    "VAE",
    "VAEConfig",
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
    "PixelCNN",
    "PixelCNNConfig",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "WaveNet",
    "WaveNetConfig",
    "SBN",
    "SBNConfig",
    "BernoulliMixture",
    "BernoulliMixtureConfig",
    "GaussianMixture",
    "GaussianMixtureConfig",
]
