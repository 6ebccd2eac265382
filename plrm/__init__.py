"""plrm: personalized reward modeling and personalized alignment of LLMs, on PyTorch Lightning."""

__version__ = "0.1.0"
