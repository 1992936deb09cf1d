"""slimtune: factored weights (base + low-rank + sparse) for adapting and compressing pretrained models."""

__version__ = "0.1.0"
