"""A character-level recurrent network (char-RNN; Graves 2013, Karpathy 2015).

The chain rule with every conditional read off a recurrent state::

    h_0 = RNN(START),   h_t = RNN(h_{t-1}, e(x_{t-1})),   p(x_t | x_<t) = softmax(W h_t + b)

where ``RNN`` is a (stack of) LSTM (Hochreiter & Schmidhuber 1997) or GRU (Cho et al. 2014)
cells and ``e`` embeds the previous symbol (``ShiftedEmbedding``: position 0 reads a
learned START vector). ``h_t`` summarizes ``x_<t`` and nothing else, so the conditionals
are causal by construction and one teacher-forced pass over the data gives all of them;
sampling runs the recursion one step at a time, carrying the state.

Data: END-padded character strings (``names``: a position after the first END, and the
last position, is END with probability one and scores 0, so the model is normalized over
strings of at most ``T - 1`` characters; see :mod:`models.autoregressive.sequence`), or any
binary / categorical data read in raster order (``--opt sequence=raster``). The network's
weights do not depend on ``T``: a trained model scores a string the same way under any
maximum length longer than the string plus its END.

**As a VAE decoder** (Bowman et al. 2016; ``models/latent/ar_vae.py``): built with
``context_dim = L > 0`` the network models ``p(x | z)`` for a context ``z [B, L]``, which
sets the initial state, ``(h_0, c_0) = tanh(W z + b)`` (every layer), and is concatenated to
the input of every step, ``[e(x_{t-1}); z]``. ``context_dim = 0`` (the default) builds
neither: the model is then exactly the unconditional char-RNN.

References: A. Graves, "Generating sequences with recurrent neural networks", 2013;
S. R. Bowman et al., "Generating sentences from a continuous space", CoNLL 2016;
A. Karpathy, "The unreasonable effectiveness of recurrent neural networks", 2015 (char-rnn:
2-layer LSTMs of 512 units, the ``karpathy`` preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from models.autoregressive.sequence import SequenceModel, ShiftedEmbedding, sequence_for
from models.base import DataSpec, DGMError
from models.registry import register_model

__all__ = ["CharRNN", "CharRNNConfig", "PRESETS"]

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class CharRNNConfig:
    """``cell``: lstm or gru; ``embedding``: size of ``e``; ``hidden``: state size per layer;
    ``dropout``: on the inputs and outputs of the recurrent stack (and between its layers);
    ``sequence``: auto, tokens or raster (see :func:`~models.autoregressive.sequence.sequence_for`)."""

    cell: str = "lstm"
    embedding: int = 32
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.0
    sequence: str = "auto"


PRESETS = {
    "small": CharRNNConfig(embedding=16, hidden=64),
    "names": CharRNNConfig(embedding=32, hidden=256, layers=2, dropout=0.2),
    "karpathy": CharRNNConfig(embedding=64, hidden=512, layers=2, dropout=0.5),
}


@register_model
class CharRNN(SequenceModel):
    """Char-RNN (LSTM or GRU) for END-padded strings or raster-scanned discrete data."""

    name = "charrnn"
    config_class = CharRNNConfig
    presets = PRESETS

    def __init__(self, data_spec: DataSpec, config: Optional[CharRNNConfig] = None, context_dim: int = 0):
        super().__init__(data_spec)
        self.config = config = config or CharRNNConfig()
        if config.cell not in CELLS:
            raise DGMError(f"unknown cell {config.cell!r}; choose from {sorted(CELLS)}")
        if min(config.embedding, config.hidden, config.layers) < 1:
            raise DGMError(f"embedding, hidden and layers must be >= 1, got {config}")
        if not 0 <= config.dropout < 1:
            raise DGMError(f"dropout must be in [0, 1), got {config.dropout}")
        if context_dim < 0:
            raise DGMError(f"context_dim must be >= 0 (0: unconditional), got {context_dim}")
        self.context_dim = context_dim
        self.sequence = sequence_for(data_spec, config.sequence, "CharRNN")
        levels = self.sequence.levels
        self.embed = ShiftedEmbedding(levels, config.embedding)
        self.rnn = CELLS[config.cell](
            config.embedding + context_dim,
            config.hidden,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, levels)
        if context_dim:
            states = 2 if config.cell == "lstm" else 1
            self.context_state = nn.Linear(context_dim, states * config.layers * config.hidden)

    def initial_state(self, context: Optional[Tensor]):
        """``None`` (zeros) without context; else ``tanh(W z + b)`` split into the cell's
        state(s), each ``[layers, B, hidden]``."""
        if context is None:
            return None
        layers, hidden = self.config.layers, self.config.hidden
        raw = torch.tanh(self.context_state(context)).reshape(context.shape[0], -1, layers, hidden)
        states = raw.permute(1, 2, 0, 3).contiguous()  # [states, layers, B, hidden]
        return (states[0], states[1]) if self.config.cell == "lstm" else states[0]

    def _inputs(self, embedded: Tensor, context: Optional[Tensor]) -> Tensor:
        """The RNN inputs ``[B, T, embedding (+ context_dim)]``: ``z`` joins every step's input."""
        if context is None:
            return embedded
        return torch.cat([embedded, context[:, None].expand(-1, embedded.shape[1], -1)], dim=-1)

    def logits(self, features: Tensor, context: Optional[Tensor] = None) -> Tensor:
        inputs = self._inputs(self.drop(self.embed(features)), context)
        out, _ = self.rnn(inputs, self.initial_state(context))
        return self.head(self.drop(out))

    def step(self, x: Tensor, t: int, state, context: Optional[Tensor] = None):
        previous = None if t == 0 else self.sequence.features(x[:, t - 1])
        if t == 0:
            state = self.initial_state(context)
        inputs = self._inputs(self.drop(self.embed.at(previous, x.shape[0]))[:, None], context)
        out, state = self.rnn(inputs, state)
        return self.head(self.drop(out[:, 0])), state
