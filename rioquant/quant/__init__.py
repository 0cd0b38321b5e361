"""Quant types, the conversion plan, recipes, imatrix and error reports."""

from rioquant.quant.api import dequantize, quantize

__all__ = ["dequantize", "quantize"]
