"""A trained nano Qwen3.5-MoE: the model the fidelity bench quantizes.

Random weights give near-uniform logits, where every quant looks alike. This package trains a small
`qwen3_5_moe` (transformers) on text that is on every machine and licensed for it, Python's own
standard library (PSF License 2.0), with a BPE tokenizer trained on that text behind the Qwen3.5
pre-tokenizer, deterministically from a seed, in about a quarter of an hour on 2 CPU cores.

- `corpus`: the text, split by file into train / calibration / evaluation.
- `tokenizer`: the BPE vocabulary and the tokenizer files a Qwen3.5 checkpoint carries.
- `train`: the model, the training loop and the BF16 checkpoint (`python -m bench.nano.train`).
"""
