"""Evaluation: perplexity, KL divergence and importance matrices from a streamed PyTorch forward pass.

pipelines.py  the three pipelines (tokenize → stream the layers → score the head)
engine.py     layer-major streaming, activations in RAM or on disk, per-layer profile
forward.py    the qwen35moe text model's math (attention, Gated DeltaNet, MoE)
numerics.py   exact float32, or ggml-cpu's activation roundings
source.py     weights by layer from a checkpoint or a GGUF; dequant.py: torch/Numba dequantization
head.py       the output head a vocabulary slice at a time; stats.py: llama-perplexity's statistics
text.py       tokenization and chunks (GGUF files are read through rioquant.files)
imatrix_collect.py   Σx² per weight input, written in llama.cpp's GGUF imatrix format
"""
