"""The parallel drivers are compiled once per kernel and loaded from Numba's cache by every later process."""

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, numpy as np
from rioquant.quant import quantize
from rioquant.quant.error_sums import slice_sums
from rioquant.kernels.driver import quantize_driver, specialise
from rioquant.quant.api import quantize_measured
from rioquant.quant.error_sums import _block_row_sums_over, _quantize_sum_rows_over
from rioquant.quant.types import BLOCK_KERNELS, T
x = np.linspace(-1, 1, 2 * 256, dtype=np.float32).reshape(2, 256)
slice_sums(x, quantize(x, "Q4_K"), "Q4_K")
quantize_measured(x, "Q4_K")
q4_k = BLOCK_KERNELS[T.Q4_K]
drivers = [quantize_driver(q4_k.quantize_row),
           specialise(_block_row_sums_over, q4_k.dequantize_row, parallel=False),
           specialise(_quantize_sum_rows_over, q4_k.quantize_row, q4_k.dequantize_row)]
print(json.dumps([[sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())] for d in drivers]))
"""


def _probe() -> list[list[int]]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_compiles_no_driver():
    first = _probe()  # Numba's usual cache (the suite's other tests share it): may compile, may load
    assert _probe() == [[1, 0], [1, 0], [1, 0]], f"first process (hits, misses): {first}"
