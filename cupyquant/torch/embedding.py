"""Embeddings: ``Embedding`` / ``StableEmbedding`` (float, 32-bit optimizer state) and the
quantized lookup tables ``Embedding4bit`` / ``EmbeddingNF4`` / ``EmbeddingFP4`` /
``Embedding8bit``, which dequantize only the rows they look up.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F
from ._interop import FLOAT_DTYPES
from .int8 import int8_vectorwise_quant
from .optim import GlobalOptimManager
from .parameters import PackedWeightStateDict, Params4bit

__all__ = ["Embedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4", "StableEmbedding"]


class Embedding(nn.Embedding):
    """``nn.Embedding`` with xavier-uniform init and 32-bit optimizer state for its weight
    (registered with :class:`~cupyquant.torch.optim.GlobalOptimManager`)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device=device,
            dtype=dtype,
        )
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def _fill_padding_idx_with_zero(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def forward(self, input: Tensor) -> Tensor:
        """input: integer indices of any shape -> (*input.shape, embedding_dim)."""
        return nn.functional.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class StableEmbedding(Embedding):
    """:class:`Embedding` followed by a LayerNorm computed in full precision (the default
    dtype); the output is in the weight's dtype."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            device,
            dtype,
        )
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def forward(self, input: Tensor) -> Tensor:
        """input: integer indices -> (*input.shape, embedding_dim) in the weight's dtype."""
        emb = super().forward(input)
        # the layer norm always runs in full precision
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)


class Embedding4bit(PackedWeightStateDict, nn.Embedding):
    """An embedding table stored as 4-bit codes (bitsandbytes' ``Embedding4bit``).

    Quantized on the first move to a device, like :class:`Linear4bit` (absmax is not
    double-quantized). When ``embedding_dim`` is a multiple of the blocksize, a lookup
    decodes only the rows asked for; otherwise the whole table is decoded per call
    (warned once at construction). The state dict has the Linear4bit layout.

    Args:
        num_embeddings, embedding_dim: table size.
        dtype: dtype of the float table and of the output.
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as.
        device: where the float table is created.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=False,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        blocksize = self.weight.blocksize
        if embedding_dim % blocksize != 0:
            warnings.warn(
                f"Embedding size {embedding_dim} is not divisible by block size {blocksize}. "
                "This will lead to slow inference.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def quant_state(self) -> Any:
        """The weight's QuantState (None until quantized); the weight owns it."""
        return getattr(self.weight, "quant_state", None)

    def _rows(self, input: Tensor, state: F.QuantState) -> Tensor:
        """Decode only the looked-up rows: gather their packed bytes and absmax, then
        dequantize them as one small array (whole blocks per row, so no block straddles)."""
        blocks_per_row = self.embedding_dim // state.blocksize
        packed = self.weight.data.view(torch.uint8).reshape(self.num_embeddings, self.embedding_dim // 2)
        absmax = state.absmax
        if state.nested:
            absmax = F.dequantize_blockwise(absmax, state.state2) + state.offset
        rows = nn.functional.embedding(input.reshape(-1), packed)
        row_absmax = nn.functional.embedding(input.reshape(-1), absmax.reshape(self.num_embeddings, blocks_per_row))
        rows_state = F.QuantState(
            absmax=row_absmax.reshape(-1),
            shape=(*input.shape, self.embedding_dim),
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        return F.dequantize_4bit_as(rows, rows_state, self.dtype)

    def forward(self, input: Tensor) -> Tensor:
        """input: integer indices of any shape -> (*input.shape, embedding_dim) of ``self.dtype``."""
        state = self.quant_state
        if state is None:
            raise RuntimeError(
                f"{type(self).__name__}.weight is not quantized yet: move the layer to its device first "
                "(.to(device), .cuda() or .cpu()), or load a quantized state dict"
            )
        if self.embedding_dim % state.blocksize == 0:
            return self._rows(input, state)
        table = F.dequantize_4bit_as(self.weight, state, self.dtype)
        return nn.functional.embedding(input, table)

    def float_weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)


class EmbeddingFP4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="fp4"``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, dtype=dtype, quant_type="fp4", quant_storage=quant_storage, device=device
        )


class EmbeddingNF4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="nf4"``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, dtype=dtype, quant_type="nf4", quant_storage=quant_storage, device=device
        )


def _rowwise_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """LLM.int8 row-wise quantization of a table (``int8_vectorwise_quant``):
    ``(CB int8 of weight's shape, SCB float32[rows])``; a meta table gets meta placeholders."""
    if weight.is_meta:
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(
            weight.shape[0], dtype=torch.float32, device="meta"
        )
    codes, scb, _ = int8_vectorwise_quant(weight.detach())
    return codes, scb


class Embedding8bit(nn.Embedding):
    """An embedding table stored as row-wise int8 codes plus one float32 scale a row.

    The table is quantized at construction (on ``device``; a meta table waits for
    ``load_state_dict(..., assign=True)``). A lookup decodes the rows it returns:
    ``CB[i] * SCB[i] / 127`` in float32, cast to ``dtype``. The state dict holds
    ``weight`` (int8) and ``SCB`` (float32[num_embeddings]); a float ``weight`` (from
    ``nn.Embedding``) is quantized when loaded.

    Args:
        num_embeddings, embedding_dim: table size.
        device: where the table lives.
        dtype: dtype of the float table and of the output.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        codes, scb = _rowwise_int8(self.weight)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("SCB", scb)

    def forward(self, input: Tensor) -> Tensor:
        """input: integer indices of any shape -> (*input.shape, embedding_dim) of ``self.dtype``."""
        rows = nn.functional.embedding(input, self.weight)
        row_scale = nn.functional.embedding(input, self.SCB.view(self.num_embeddings, 1))
        return (rows * (row_scale / 127.0)).to(self.dtype)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is None or weight.dtype not in FLOAT_DTYPES:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        # A float table: quantize it, then load the codes and scales as if saved.
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)} from checkpoint, "
                f"the shape in current model is {(self.num_embeddings, self.embedding_dim)}"
            )
            return
        codes, scb = _rowwise_int8(weight)
        converted = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        converted[key], converted[prefix + "SCB"] = codes, scb
        super()._load_from_state_dict(
            converted, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
