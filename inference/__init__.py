"""Fitting and evaluating models; knows nothing about particular models."""
