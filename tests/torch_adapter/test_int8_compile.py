"""torch.compile of the int8 side: the ``cupyquant::int8_*`` custom ops, Linear8bitLt
inference and matmul's forward and backward traced with fullgraph=True, bit-equal to
eager mode. CPU everywhere; the cuda variants run under the gpu marker."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from cupyquant.torch import int8 as T  # noqa: E402

from .helpers import same_bytes  # noqa: E402

OPS = (
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_double_quant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_linear",
    "int8_weight_grad",
)
N_OP_CASES = 12  # len(_op_cases(...)), for the opcheck parametrization


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: cached graphs or a reached recompile limit would
    let a call run eagerly and pass for the wrong reason."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def needs_torch_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")


def with_outliers(x: torch.Tensor) -> torch.Tensor:
    """``x`` with two columns far above the 6.0 threshold (in every row)."""
    x = x.clone()
    x[..., 7] = 8.0
    x[..., 30] = -7.5
    return x


def cupyquant_ops(counter: CompileCounterWithBackend) -> set[str]:
    """Names of the cupyquant ops in the captured graphs, autograd subgraphs included."""
    names = set()
    for gm in counter.graphs:
        for module in gm.modules():
            if not isinstance(module, torch.fx.GraphModule):
                continue
            for node in module.graph.nodes:
                if node.op == "call_function" and str(node.target).startswith("cupyquant."):
                    names.add(str(node.target).split(".")[1])
    return names


def as_tuple(result):
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def compiled(fn):
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


# ---------------------------------------------------------------------------------------
# Linear8bitLt inference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 17, 64)], ids=str)
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_linear8bitlt_compiled_forward_is_bit_equal(device, threshold, shape, grad_mode):
    needs_torch_device(device)
    torch.manual_seed(shape[0])
    layer = T.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=threshold).to(device)
    x = with_outliers(torch.randn(shape, dtype=torch.float16, device=device))
    assert (x.abs() >= 6.0).any()
    fn, counter = compiled(layer)
    # With grad enabled the float32 bias requires grad: the autograd function is traced.
    with torch.set_grad_enabled(grad_mode):
        got, want = fn(x), layer(x)
    assert same_bytes(got, want)
    assert counter.frame_count == 1 and "int8_linear" in cupyquant_ops(counter)


def test_linear8bitlt_compiled_input_gradient_is_bit_equal(device):
    needs_torch_device(device)
    torch.manual_seed(9)
    layer = T.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=6.0).to(device)
    x0 = with_outliers(torch.randn(6, 64, dtype=torch.float16, device=device))
    g = torch.randn(6, 48, dtype=torch.float16, device=device)
    fn, counter = compiled(layer)
    results = []
    for call in (fn, layer):
        x = x0.clone().requires_grad_()
        layer.bias.grad = None
        y = call(x)
        y.backward(g)
        results.append((y, x.grad, layer.bias.grad))
    for got, want in zip(*results, strict=True):
        assert same_bytes(got, want)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------
# matmul / matmul_mixed forward and backward
# ---------------------------------------------------------------------------------------
def _weight(kind: str, w0: torch.Tensor, state: T.MatmulLtState) -> torch.Tensor:
    if kind in ("float32", "float16"):
        return w0.to(getattr(torch, kind)).requires_grad_()
    if kind == "int8":
        codes, scb, _ = T.int8_vectorwise_quant(w0.half())
        state.SCB = scb
        return codes
    return T.Int8Params(w0.cpu(), requires_grad=False, has_fp16_weights=False).to(w0.device)


@pytest.mark.parametrize("fn", [T.matmul, T.matmul_mixed], ids=lambda f: f.__name__)
@pytest.mark.parametrize("weight", ["float32", "float16", "int8", "int8params"])
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_matmul_compiled_forward_backward_is_bit_equal(device, fn, weight, threshold):
    needs_torch_device(device)
    torch.manual_seed(11)
    x0 = torch.randn(12, 64, device=device)
    x0[:, 5] *= 10  # outlier columns for threshold 3
    w0 = torch.randn(24, 64, device=device)
    b0 = torch.randn(24, device=device)
    g = torch.randn(12, 24, device=device)

    def product(x, w, b, state):
        return fn(x, w, state=state, bias=b)

    compiled_product, counter = compiled(product)
    results = []
    for call in (compiled_product, product):
        state = T.MatmulLtState(threshold=threshold, has_fp16_weights=True)
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        w = _weight(weight, w0, state)
        y = call(x, w, b, state)
        y.backward(g)
        grads = [x.grad, b.grad] + ([w.grad] if w.requires_grad else [])
        assert all(t is not None for t in grads)
        results.append([y, *grads, state.CB if weight.startswith("float") else w])
    for got, want in zip(*results, strict=True):
        assert same_bytes(got, want)
    expected = {"int8_linear"}
    if weight.startswith("float"):
        expected.add("int8_vectorwise_quant")  # the weight, quantized per call
        if fn is T.matmul:
            expected.add("int8_weight_grad")
    assert counter.frame_count == 1 and cupyquant_ops(counter) == expected


def test_matmul_compiled_with_changing_batch_sizes(device):
    """Later calls with other row counts recompile with symbolic sizes, still in one graph."""
    needs_torch_device(device)
    torch.manual_seed(12)
    w = torch.randn(16, 32, device=device, requires_grad=True)
    state = T.MatmulLtState(threshold=3.0)
    fn, counter = compiled(lambda x: T.matmul(x, w, state=state))
    for rows in (2, 3, 7, 11):
        x = torch.randn(rows, 32, device=device) * 2
        assert same_bytes(fn(x), T.matmul(x, w, state=state))
    assert counter.frame_count <= 2


# ---------------------------------------------------------------------------------------
# the public tensor ops
# ---------------------------------------------------------------------------------------
def test_public_ops_compiled_match_eager(device):
    needs_torch_device(device)
    torch.manual_seed(13)
    x = with_outliers(torch.randn(5, 64, dtype=torch.bfloat16, device=device))
    cb, scb, _ = T.int8_vectorwise_quant(torch.randn(8, 64, device=device).half())
    bias = torch.randn(8, dtype=torch.float16, device=device)

    def ops(x, out):
        ca, sca, cols = T.int8_vectorwise_quant(x)
        deq = T.int8_vectorwise_dequant(ca, sca)
        acc = T.int8_linear_matmul(ca, cb, out=out)
        y = T.int8_mm_dequant(acc, sca, scb, bias=bias, dtype=torch.float32)
        double = T.int8_double_quant(x)
        lin = T.int8_linear(x, cb, scb, bias, 6.0)
        return cols, double[4], (ca, sca, deq, acc, y, *double[:4], lin)

    fn, counter = compiled(ops)
    out_compiled = torch.empty(5, 8, dtype=torch.int32, device=device)
    out_eager = torch.empty_like(out_compiled)
    cols, double_cols, got = fn(x, out_compiled)
    *_, want = ops(x, out_eager)
    assert cols is None and double_cols is None
    for a, b in zip(got, want, strict=True):
        assert same_bytes(a, b)
    assert same_bytes(out_compiled, out_eager)
    assert counter.frame_count == 1 and cupyquant_ops(counter) == set(OPS) - {"int8_weight_grad"}


def test_outlier_columns_compile_with_dynamic_output_shapes(device):
    """The outlier column count depends on the data: an unbacked size in the graph (some
    torch releases trace it only with capture_dynamic_output_shape_ops, so it is set)."""
    needs_torch_device(device)
    x = with_outliers(torch.randn(4, 64, device=device))

    def ops(x):
        return T.int8_vectorwise_quant(x, 6.0), T.int8_double_quant(x, threshold=6.0)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        fn, counter = compiled(ops)
        got = fn(x)
    want = ops(x)
    for a, b in zip((*got[0], *got[1]), (*want[0], *want[1]), strict=True):
        assert same_bytes(a, b)
    assert got[0][2].tolist() == [7, 30] and counter.frame_count == 1


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_launch_the_kernels_directly():
    """The eager path stays direct: no custom-op dispatch per call."""
    x = with_outliers(torch.randn(3, 64))
    w = torch.randn(8, 64, requires_grad=True)
    layer = T.Linear8bitLt(64, 8, has_fp16_weights=False, threshold=6.0).cpu()
    with _OpLog() as log:
        T.matmul(x.requires_grad_(), w, threshold=6.0).sum().backward()
        layer(x)
        T.int8_double_quant(x, threshold=6.0)
    assert log.names and not [name for name in log.names if name.startswith("cupyquant.")]


# ---------------------------------------------------------------------------------------
# the custom ops themselves
# ---------------------------------------------------------------------------------------
def _op_cases(device: torch.device) -> list[tuple[str, tuple]]:
    torch.manual_seed(14)
    x = with_outliers(torch.randn(3, 64, dtype=torch.float16, device=device))
    ca, sca, _ = T.int8_vectorwise_quant(x)
    cb, scb, _ = T.int8_vectorwise_quant(torch.randn(8, 64, device=device).half())
    acc = T.int8_linear_matmul(ca, cb)
    bias = torch.randn(8, device=device)
    g = torch.randn(3, 8, dtype=torch.float16, device=device)
    x3 = with_outliers(torch.randn(2, 3, 64, dtype=torch.bfloat16, device=device))
    return [
        ("int8_vectorwise_quant", (x, 6.0)),
        ("int8_vectorwise_quant", (x3, 0.0)),
        ("int8_vectorwise_dequant", (ca, sca)),
        ("int8_double_quant", (x, 6.0)),
        ("int8_double_quant", (x3, 0.0)),
        ("int8_linear_matmul", (ca, cb)),
        ("int8_mm_dequant", (acc, sca, scb, bias, torch.bfloat16)),
        ("int8_mm_dequant", (acc, sca, scb, None, torch.float16)),
        ("int8_linear", (x, cb, scb, bias, 6.0)),
        ("int8_linear", (x3, cb, scb, None, 0.0)),
        ("int8_weight_grad", (g, x, 6.0, torch.float32)),
        ("int8_weight_grad", (g, x, 0.0, torch.float16)),
    ]


def test_every_op_is_registered():
    cases = _op_cases(torch.device("cpu"))
    assert len(cases) == N_OP_CASES and {name for name, _ in cases} == set(OPS)
    for name in OPS:
        assert getattr(torch.ops.cupyquant, name).default._schema.name == f"cupyquant::{name}"


@pytest.mark.parametrize("case", range(N_OP_CASES))
def test_ops_pass_opcheck(device, case):
    needs_torch_device(device)
    name, args = _op_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.cupyquant, name).default, args)


def test_fake_impls_give_shapes_and_dtypes(device):
    needs_torch_device(device)
    for name, args in _op_cases(device):
        op = getattr(torch.ops.cupyquant, name).default
        real = op(*args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        for r, f in zip(as_tuple(real), as_tuple(fake), strict=True):
            assert (tuple(f.shape), f.dtype, f.device) == (tuple(r.shape), r.dtype, r.device), name


def test_outlier_mask_of_the_quant_ops():
    x = with_outliers(torch.randn(4, 64))
    *_, mask = torch.ops.cupyquant.int8_vectorwise_quant(x, 6.0)
    assert mask.dtype == torch.uint8 and mask.shape == (64,)
    assert torch.nonzero(mask).reshape(-1).tolist() == T.int8_vectorwise_quant(x, 6.0)[2].tolist() == [7, 30]
    assert not torch.ops.cupyquant.int8_double_quant(x, 0.0)[4].any()
