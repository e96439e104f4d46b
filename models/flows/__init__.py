"""Normalizing flows as exact density models: NICE, Real NVP and MAF."""

from models.flows.base import FlowModel, logit_bits_per_dim
from models.flows.maf import MAF, MAFConfig
from models.flows.nice import NICE, NICEConfig
from models.flows.realnvp import RealNVP, RealNVPConfig

__all__ = ["FlowModel", "logit_bits_per_dim", "NICE", "NICEConfig", "RealNVP", "RealNVPConfig", "MAF", "MAFConfig"]
