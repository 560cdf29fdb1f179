"""SMFSR: noise-started one-step super-resolution with an LR-conditioned mean-flow network."""

__version__ = "0.1.0"
