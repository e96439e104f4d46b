"""Sequence datasets built by other modules, loaded lazily (they need optional tools):
``names`` (census first names as characters, :mod:`experiments.names`; needs
``pip install names``) and ``speech`` (spoken words synthesized by espeak-ng, mu-law
quantized, :mod:`experiments.speech`; needs espeak-ng).
"""

from __future__ import annotations

from experiments.data.dataset import DATASETS, Dataset, _Request


@DATASETS.register(
    "names", "census first names as END-padded character tokens (4,131/516/516); needs `pip install names`"
)
def _load_names(req: _Request) -> Dataset:
    """First names as character tokens; see :mod:`experiments.names`."""
    from experiments.names import load_names

    return load_names()


@DATASETS.register(
    "speech", "35 spoken words synthesized by espeak-ng, 8 kHz mu-law 256 levels, 0.5 s clips; needs espeak-ng"
)
def _load_speech(req: _Request) -> Dataset:
    """Spoken words synthesized with espeak-ng; see :mod:`experiments.speech`."""
    from experiments.speech import load_speech

    return load_speech()
