"""kexue: measured, tested PyTorch tools for probabilistic deep learning."""

__version__ = "0.1.0"
