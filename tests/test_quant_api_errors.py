"""Bad input to quantize/dequantize gets a clear error, never garbage."""

import numpy as np
import pytest

from rioquant.errors import QuantInputError
from rioquant.quant import dequantize, quantize


def test_nan_names_first_bad_row():
    x = np.zeros((4, 256), np.float32)
    x[2, 17] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(QuantInputError, match="row 2 "):
        quantize(x, "Q8_0")


def test_inf_is_refused():
    x = np.zeros((2, 256), np.float32)
    x[1, 5] = -np.inf
    with pytest.raises(QuantInputError, match="row 1 "):
        quantize(x, "F16")


def test_row_length_not_multiple_of_block():
    with pytest.raises(QuantInputError, match="row length 100 .* block size 32"):
        quantize(np.zeros((1, 100), np.float32), "Q8_0")


@pytest.mark.parametrize("bad", [np.zeros((2, 256), np.float64), np.zeros(256, np.float32), [[0.0] * 256]])
def test_wrong_dtype_or_shape(bad):
    with pytest.raises(QuantInputError, match="float32 array"):
        quantize(bad, "Q8_0")


def test_imatrix_shape_and_dtype():
    x = np.zeros((1, 256), np.float32)
    with pytest.raises(QuantInputError, match=r"imatrix must be float32 of shape \(256,\)"):
        quantize(x, "Q8_0", imatrix=np.ones(128, np.float32))
    with pytest.raises(QuantInputError, match="imatrix must be float32"):
        quantize(x, "Q8_0", imatrix=np.ones(256, np.float64))


def test_unknown_type_lists_choices():
    with pytest.raises(QuantInputError, match="unsupported tensor type 'Q9_K'"):
        quantize(np.zeros((1, 256), np.float32), "Q9_K")


def test_dequantize_size_mismatch():
    with pytest.raises(QuantInputError, match="does not hold shape"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (1, 32))
