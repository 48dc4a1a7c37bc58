"""cupyquant.torch: bitsandbytes-compatible torch layers over cupyquant's kernels.

A bitsandbytes user switches by changing the import::

    import cupyquant.torch as bnb
    layer = bnb.nn.LinearNF4(4096, 4096, compute_dtype=torch.bfloat16).cuda()

Tensors cross into the kernels without copies (DLPack on CUDA, NumPy on the CPU), on
torch's current stream; everything also runs on the CPU.
"""

from __future__ import annotations

from . import functional, nn, optim, utils
from .autograd import MatMul4Bit, matmul_4bit
from .embedding import Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, StableEmbedding
from .functional import QuantState
from .int8 import (
    Int8Params,
    Linear8bitLt,
    MatmulLtState,
    OutlierAwareLinear,
    OutlierTracer,
    SwitchBackLinearBnb,
    matmul,
)
from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .optim import GlobalOptimManager
from .parameters import Params4bit
from .utils import quantize_model, replace_linear

__all__ = [
    "Embedding",
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "GlobalOptimManager",
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "LinearFP4",
    "LinearNF4",
    "MatMul4Bit",
    "MatmulLtState",
    "OutlierAwareLinear",
    "OutlierTracer",
    "Params4bit",
    "QuantState",
    "StableEmbedding",
    "SwitchBackLinearBnb",
    "functional",
    "matmul",
    "matmul_4bit",
    "nn",
    "optim",
    "quantize_model",
    "replace_linear",
    "utils",
]
