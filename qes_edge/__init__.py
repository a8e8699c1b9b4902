"""qes-edge: Quantized Evolution Strategies on GGUF models, on a CPU."""

__version__ = "0.1.0"
