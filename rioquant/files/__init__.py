"""Files on disk, below every other package: GGUF headers and split sets, positioned reads, safe writes.

Nothing here knows an architecture or a recipe; `export`, `quant`, `evaluate` and `publish` all read
and write through it, so each file format fact (a tensor's byte count, a split name, a header field)
is written once.
"""
