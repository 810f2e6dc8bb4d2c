"""kdexp: knowledge distillation experiments for autoregressive language models."""

__version__ = "0.1.0"
