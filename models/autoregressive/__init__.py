"""Fully observed autoregressive models: exact log p(x), ancestral sampling, empty guides."""
