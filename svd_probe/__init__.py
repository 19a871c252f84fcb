"""svd-probe: spectral analysis of attention weights in very large transformer checkpoints."""

__version__ = "0.1.0"
