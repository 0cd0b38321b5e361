"""`rioquant lineage`: what a checkpoint is made of — an exact blend of its parents, a blend plus an
update, or no blend — with the evidence to settle a dispute (docs/lineage.md).

    sources.py   open the models, check they compare, plan units and pieces, stream them
    kernels.py   Numba: one pass per piece gives every per-block sum, the null and exact-match counts
    stats.py     the blend fit, block bootstrap, null scores, candidate recipes, per-unit reduction
    verdict.py   figures and verdict per unit, per tensor and for the model
    pipeline.py  open → plan → stream → reduce → judge → report dict
    report.py    the summary text, the PNGs, the JSON file
"""
