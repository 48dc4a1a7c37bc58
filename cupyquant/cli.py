"""The ``cupyquant`` command: ``quantize``, ``inspect`` and ``bench``.

Exit codes: 0 done; 1 a failure while working (e.g. the disk filled up), a missing
package, or ``bench`` without a GPU; 2 bad input or options (one line on stderr, as argparse does); 130
interrupted. Tables go to stdout, the progress bar to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from . import _xp
from ._checkpoint import (
    COMPUTE_DTYPES,
    FORMATS,
    CheckpointError,
    InspectRow,
    QuantizeOptions,
    TensorReport,
    inspect_checkpoint,
    quantize_checkpoint,
)
from ._safetensors_stream import SafetensorsError
from .blockwise import BLOCKSIZES_4BIT

__all__ = ["main"]

# With no input file, the bundled MiniLM's embedding tables stay float, as transformers
# keeps nn.Embedding layers when it loads a model in 4 or 8 bits; only its Linear layers
# (and so the model a quantized checkpoint is loaded into) change.
DEMO_SKIP = ("embeddings",)


class UsageError(Exception):
    """Bad input or options: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
def _out(line: str = "") -> None:
    """One line of the command's output on stdout."""
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    """One line on stderr."""
    sys.stderr.write(line + "\n")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned text columns; column indices in ``right`` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        """One row, padded to the column widths."""
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _shape(shape: Sequence[int]) -> str:
    """A shape as text: 384x1536, or () for a scalar."""
    return "x".join(str(s) for s in shape) if shape else "()"


def _mib(n: int) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n / 2**20:,.1f} MiB"


class _Progress:
    """A progress bar over input bytes on stderr: tqdm when installed, else a plain one
    (drawn only on a terminal, so logs don't fill with carriage returns). It appears at
    the first update, so a command that fails its checks prints nothing but the error."""

    def __init__(self, desc: str, stream: TextIO) -> None:
        self._done = 0
        self._total = 1
        self._stream = stream
        self._desc = desc
        self._bar = None
        self._plain = False

    def _start(self) -> None:
        """Create the bar: tqdm, or the plain one on a terminal."""
        try:
            from tqdm import tqdm
        except ImportError:
            self._plain = self._stream.isatty()
        else:
            self._bar = tqdm(total=self._total, desc=self._desc, unit="B", unit_scale=True, file=self._stream,
                             leave=False)  # fmt: skip

    def update(self, name: str, done: int, total: int) -> None:
        """Record that ``done`` of ``total`` input bytes are processed, the last being tensor ``name``."""
        if self._bar is None and not self._plain:
            self._total = max(total, 1)
            self._start()
        if self._bar is not None:
            self._bar.set_postfix_str(name[-40:], refresh=False)
            self._bar.update(done - self._done)
        elif self._plain:
            filled = int(30 * done / self._total)
            self._stream.write(f"\r{self._desc} [{'#' * filled}{'.' * (30 - filled)}] {done / self._total:4.0%}")
            self._stream.flush()
        self._done = done

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            self._stream.write("\r" + " " * (len(self._desc) + 40) + "\r")
            self._stream.flush()


# ---------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------
def _resolve_input(args: argparse.Namespace) -> tuple[Path, tuple[str, ...], Path]:
    """(input file, skip patterns, output file), filling in the bundled MiniLM when no input is given."""
    skip = tuple(args.skip or ())
    if args.input is None:
        # "--skip a b IN.safetensors" would read the file name as a pattern (nargs="+")
        stray = [p for p in skip if p.endswith(".safetensors") or Path(p).is_file()]
        if stray:
            raise UsageError(f"--skip takes module names, got the file {stray[0]!r}; put IN.safetensors before --skip")
        from .demo import DEMO_NAME, minilm_checkpoint

        try:
            src = minilm_checkpoint()
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        out = Path(args.output) if args.output else Path(f"{DEMO_NAME}-{args.format}.safetensors")
        return src, skip if args.skip is not None else DEMO_SKIP, out
    src = Path(args.input)
    out = Path(args.output) if args.output else Path(f"{src.stem}-{args.format}.safetensors")
    return src, skip, out


def _options(args: argparse.Namespace, skip: tuple[str, ...]) -> QuantizeOptions:
    """The quantize options from the arguments, or a UsageError naming the bad one."""
    if args.format == "int8":
        for flag, given in (("--blocksize", args.blocksize is not None), ("--double-quant", args.double_quant),
                            ("--compute-dtype", args.compute_dtype is not None)):  # fmt: skip
            if given:
                raise UsageError(f"{flag} applies to --format nf4 and fp4, not int8")
    blocksize = 64 if args.blocksize is None else args.blocksize
    if blocksize not in BLOCKSIZES_4BIT:
        raise UsageError(f"--blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")
    compute = "float32" if args.compute_dtype is None else COMPUTE_DTYPES.get(args.compute_dtype.lower())
    if compute is None:
        raise UsageError(f"--compute-dtype must be one of {tuple(COMPUTE_DTYPES)}, got {args.compute_dtype!r}")
    return QuantizeOptions(args.format, blocksize, args.double_quant, compute, skip)


def _use_gpu(device: str) -> bool:
    """Whether to quantize on the GPU, from --device (auto: when one is usable)."""
    if device == "gpu" and not _xp.gpu_available():
        raise UsageError("--device gpu needs a usable CUDA GPU, and none is (cupy.cuda.is_available() is False)")
    return device == "gpu" or (device == "auto" and _xp.gpu_available())


def _device_label(use_gpu: bool) -> str:
    """Where the work ran, for the report: CPU (NumPy) or GPU (its name)."""
    if not use_gpu:
        return "CPU (NumPy)"
    from ._bench import gpu_name

    return f"GPU ({gpu_name()})"


def _report_row(r: TensorReport) -> list[str]:
    """The table cells of one input tensor."""
    fmt = r.action if r.action != "kept" else f"kept ({r.note})"
    error = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
    return [r.name, _shape(r.shape), r.dtype, fmt, f"{r.bytes_before:,}", f"{r.bytes_after:,}", error]


def _listed(r: TensorReport) -> bool:
    """Rows of the table: every 2-D float weight (quantized, or why not); the other
    tensors (biases, norms, integer buffers) are only counted."""
    return r.rel_error is not None or r.note in ("skipped", "empty")


def _print_report(reports: list[TensorReport], options: QuantizeOptions, out: Path, seconds: float,
                  device: str) -> None:  # fmt: skip
    """The per-tensor table and the totals, on stdout."""
    header = ["tensor", "shape", "dtype", "stored as", "bytes before", "bytes after", "rel. error"]
    for line in _table(header, [_report_row(r) for r in reports if _listed(r)], right={4, 5, 6}):
        _out(line)
    others = [r for r in reports if not _listed(r)]
    if others:
        _out(f"(+ {len(others)} other tensors, not 2-D float weights, copied unchanged: "
             f"{sum(r.bytes_before for r in others):,} bytes)")  # fmt: skip
    quantized = [r for r in reports if r.rel_error is not None]
    before = sum(r.bytes_before for r in reports)
    after = sum(r.bytes_after for r in reports)
    _out()
    settings = (
        options.fmt
        if options.fmt == "int8"
        else (f"{options.fmt}, blocksize {options.blocksize}{', double quant' if options.double_quant else ''}")
    )
    _out(f"quantized {len(quantized)} of {len(reports)} tensors ({settings})")
    _out(f"total size: {before:,} -> {after:,} bytes ({_mib(before)} -> {_mib(after)}, {after / max(before, 1):.1%})")
    if quantized:
        q_before = sum(r.bytes_before for r in quantized)
        q_after = sum(r.bytes_after for r in quantized)
        numel = sum(int(r.shape[0]) * int(r.shape[1]) for r in quantized)
        errors = [r.rel_error for r in quantized]
        _out(f"quantized weights: {_mib(q_before)} -> {_mib(q_after)}, {8 * q_after / numel:.2f} bits per weight; "
             f"rel. error mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}")  # fmt: skip
    _out(f"wrote {out} on {device} in {seconds:.1f} s")


def _cmd_quantize(args: argparse.Namespace) -> int:
    """``cupyquant quantize``: quantize a checkpoint and print the report."""
    src, skip, out = _resolve_input(args)
    options = _options(args, skip)
    use_gpu = _use_gpu(args.device)
    if args.input is None:
        kept = f"; kept as they are: {', '.join(skip)}" if skip else ""
        _out(f"input: the bundled all-MiniLM-L6-v2 checkpoint ({src}){kept}")
    progress = _Progress(f"quantize {options.fmt}", sys.stderr)
    start = time.perf_counter()
    try:
        reports = quantize_checkpoint(src, out, options, use_gpu=use_gpu, progress=progress.update)
    finally:
        progress.close()
    _print_report(reports, options, out, time.perf_counter() - start, _device_label(use_gpu))
    return 0


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    """``cupyquant inspect``: one row per logical tensor, then the totals."""
    rows, metadata, file_size = inspect_checkpoint(args.file)
    header = ["tensor", "format", "shape", "bytes", "bits/weight"]

    def line(r: InspectRow) -> list[str]:
        """The table cells of one logical tensor."""
        return [r.name, r.fmt, _shape(r.shape), f"{r.nbytes:,}", f"{r.bits_per_weight:.2f}"]

    for text in _table(header, [line(r) for r in rows], right={3, 4}):
        _out(text)
    numel = sum(r.numel for r in rows)
    data = sum(r.nbytes for r in rows)
    _out()
    _out(f"{len(rows)} tensors, {numel:,} values, {data:,} bytes of data; file {file_size:,} bytes ({_mib(file_size)})")
    _out(f"overall {8 * data / max(numel, 1):.2f} bits per value")
    if "quantization_config" in metadata:
        _out(f"quantization_config: {metadata['quantization_config']}")
    return 0


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace) -> int:
    """``cupyquant bench``: the speed table on the current GPU (exit 1 without one)."""
    if not _xp.gpu_available():
        _err("cupyquant bench: no usable CUDA GPU here (cupy.cuda.is_available() is False); "
             "the speed tables need one")  # fmt: skip
        return 1
    from . import _bench

    rows = _bench.run(args.rows, args.cols, args.calls, args.repeats)
    _out(f"GPU: {_bench.gpu_name()}; {args.rows} x {args.cols} float16 ({args.rows * args.cols / 1e6:.1f} M "
         f"elements); median of {args.repeats} x {args.calls} calls, CUDA events")  # fmt: skip
    copy_gbps = rows[0].gbps
    table = [[r.label, f"{r.us:,.0f}", f"{r.gbps:,.0f}", f"{r.gbps / copy_gbps:.0%}"] for r in rows]
    for text in _table(["op", "us", "GB/s (read + written)", "of copy"], table, right={1, 2, 3}):
        _out(text)
    return 0


# ---------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error in one line (``prog: error: message``)."""

    def error(self, message: str) -> NoReturn:
        """Report a usage error in one line and exit with code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    """argparse type: an integer (the range is checked with the other options)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cupyquant`` command."""
    parser = _Parser(prog="cupyquant", description="Quantize safetensors checkpoints to NF4, FP4 or LLM.int8 "
                     "in bitsandbytes' format, look inside them, and time the kernels.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize every 2-D float weight of a checkpoint",
                       description="Quantize every 2-D floating '*.weight' of a safetensors checkpoint, one tensor at "
                       "a time, into bitsandbytes' state-dict layout; copy every other tensor unchanged.")  # fmt: skip
    q.add_argument("input", nargs="?", metavar="IN.safetensors",
                   help="the checkpoint (default: the bundled all-MiniLM-L6-v2, from cupyquant[demo])")  # fmt: skip
    q.add_argument("-o", "--output", metavar="OUT.safetensors",
                   help="where to write (default: <input name>-<format>.safetensors here)")  # fmt: skip
    q.add_argument("--format", required=True, choices=FORMATS, help="nf4, fp4 (4-bit blockwise) or int8 (LLM.int8)")
    q.add_argument("--blocksize", type=_int, default=None, help=f"4-bit blocksize, one of {BLOCKSIZES_4BIT} (64)")
    q.add_argument("--double-quant", action="store_true", help="4-bit: also quantize the absmax (nested)")
    q.add_argument("--compute-dtype", default=None, metavar="DTYPE",
                   help="4-bit compute dtype recorded in the config: fp32 (default), fp16 or bf16")  # fmt: skip
    q.add_argument("--skip", nargs="+", action="extend", metavar="MODULE",
                   help="modules to leave unquantized (prefix up to a '.', regex or suffix, as transformers' "
                   "llm_int8_skip_modules); the bundled MiniLM defaults to 'embeddings'")  # fmt: skip
    q.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="where to quantize: the GPU when usable (auto), or force one")  # fmt: skip
    q.set_defaults(run=_cmd_quantize)

    i = sub.add_parser("inspect", help="formats, shapes and bits per weight of a checkpoint")
    i.add_argument("file", metavar="FILE.safetensors")
    i.set_defaults(run=_cmd_inspect)

    b = sub.add_parser("bench", help="time the quantization kernels on the current GPU")
    b.add_argument("--rows", type=_positive, default=8192)
    b.add_argument("--cols", type=_positive, default=28672)
    b.add_argument("--calls", type=_positive, default=10, help="calls per timing")
    b.add_argument("--repeats", type=_positive, default=10, help="timings (the median is shown)")
    b.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"cupyquant {args.command}"
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (UsageError, CheckpointError, SafetensorsError, FileNotFoundError) as exc:
        _err(f"{prog}: error: {_one_line(exc)}")
        return 2
    except (OSError, ImportError) as exc:
        _err(f"{prog}: error: {_one_line(exc)}")
        return 1
    except KeyboardInterrupt:
        _err(f"{prog}: interrupted")
        return 130


def _one_line(exc: BaseException) -> str:
    """An exception's message folded into one line."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
