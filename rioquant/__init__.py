"""rioquant: stream giant Mixture-of-Experts checkpoints into GGUF quants that are bit-exact with ggml."""

__version__ = "0.1.0"
