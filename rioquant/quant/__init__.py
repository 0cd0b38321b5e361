"""Quant types, the conversion plan, recipes, imatrix and error reports."""

from rioquant.quant.api import dequantize, quantize, row_bytes

__all__ = ["dequantize", "quantize", "row_bytes"]
