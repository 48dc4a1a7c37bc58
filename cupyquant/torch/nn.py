"""The layers, under the names bitsandbytes' ``bnb.nn`` uses."""

from __future__ import annotations

from .embedding import Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, StableEmbedding
from .int8 import Int8Params, Linear8bitLt, OutlierAwareLinear, SwitchBackLinearBnb
from .linear4bit import Linear4bit, LinearFP4, LinearNF4
from .parameters import Params4bit

__all__ = [
    "Embedding",
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "LinearFP4",
    "LinearNF4",
    "OutlierAwareLinear",
    "Params4bit",
    "StableEmbedding",
    "SwitchBackLinearBnb",
]
