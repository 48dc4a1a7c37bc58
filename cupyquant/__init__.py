"""cupyquant: k-bit quantization of NumPy and CuPy arrays (NF4, FP4, 8-bit blockwise).

The array-level API. It never imports torch; see ``cupyquant.torch`` for the layers.
"""

from .blockwise import (
    BLOCKSIZES_4BIT,
    BLOCKSIZES_8BIT,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_fp4,
    dequantize_nf4,
    quantize_4bit,
    quantize_blockwise,
    quantize_fp4,
    quantize_nf4,
)
from .codebooks import create_dynamic_map, create_fp8_map, create_linear_map, create_normal_map, get_4bit_type
from .int8 import (
    INT8_MAX_K,
    get_int8_gemm_backend,
    int8_double_quant,
    int8_linear,
    int8_linear_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    outlier_columns,
    set_int8_gemm_backend,
)
from .matmul_4bit import gemv_4bit, matmul_4bit
from .quant_state import QuantState
from .tiled_4bit import Tiled4bit, tile_4bit

__version__ = "0.1.0"

__all__ = [
    "BLOCKSIZES_4BIT",
    "BLOCKSIZES_8BIT",
    "QuantState",
    "Tiled4bit",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "get_int8_gemm_backend",
    "INT8_MAX_K",
    "int8_double_quant",
    "int8_linear",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "outlier_columns",
    "set_int8_gemm_backend",
    "matmul_4bit",
    "get_4bit_type",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
    "tile_4bit",
]
