"""cupyquant.torch's 8-bit side: tensor ops, Int8Params, Linear8bitLt, matmul and its
backward, SwitchBackLinearBnb, OutlierTracer / OutlierAwareLinear. CPU everywhere; the
GPU variants (gpu marker) compare against the CPU results bit for bit."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from cupyquant import int8 as I8  # noqa: E402
from cupyquant.torch import int8 as T  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fixture(threshold: int) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"linear8bitlt_thr{threshold}.safetensors")


def module_entries(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module.") :]: v for k, v in d.items() if k.startswith("module.")}


def layer_from_float(d: dict[str, torch.Tensor], threshold: float, **kwargs) -> T.Linear8bitLt:
    layer = T.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=threshold, **kwargs)
    with torch.no_grad():
        layer.weight.data = d["fp_weight"].clone()
        layer.bias.copy_(d["fp_bias"])
    return layer


@pytest.fixture
def fresh_tracer():
    """OutlierTracer is a process-wide singleton: give each test a new one."""
    saved = T.OutlierTracer._instance
    T.OutlierTracer._instance = None
    yield T.OutlierTracer.get_instance()
    T.OutlierTracer.get_instance().remove_hooks()
    T.OutlierTracer._instance = saved


# ---------------------------------------------------------------------------------------
# tensor ops
# ---------------------------------------------------------------------------------------
def test_tensor_ops_match_the_array_api():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 48)).astype(np.float16)
    a[:, 7] *= 10
    ta = torch.from_numpy(a)
    for threshold in (0.0, 6.0):
        ca, sca, cols = T.int8_vectorwise_quant(ta, threshold)
        nca, nsca, ncols = I8.int8_vectorwise_quant(a, threshold)
        assert ca.dtype == torch.int8 and sca.dtype == torch.float32
        np.testing.assert_array_equal(ca.numpy(), nca)
        np.testing.assert_array_equal(sca.numpy(), nsca)
        if threshold:
            assert cols.dtype == torch.int64
            np.testing.assert_array_equal(cols.numpy(), ncols)
        else:
            assert cols is None
    deq = T.int8_vectorwise_dequant(ca, sca)
    np.testing.assert_array_equal(deq.numpy(), I8.int8_vectorwise_dequant(nca, nsca))
    got = T.int8_double_quant(ta, threshold=6.0)
    want = I8.int8_double_quant(a, threshold=6.0)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)
    acc = T.int8_linear_matmul(ca, ca)
    np.testing.assert_array_equal(acc.numpy(), ca.numpy().astype(np.int64) @ ca.numpy().astype(np.int64).T)
    bias = torch.randn(5, dtype=torch.bfloat16)
    for dtype in DTYPES:
        out = T.int8_mm_dequant(acc, sca, sca, bias=bias, dtype=dtype)
        assert out.dtype == dtype
    assert T.int8_mm_dequant(acc, sca, sca).dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_tensor_int8_linear_matches_the_array_api(dtype, threshold):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40).to(dtype)
    x[..., 5] *= 8
    w = torch.randn(24, 40) / 6
    cb, scb, _ = T.int8_vectorwise_quant(w)
    bias = torch.randn(24).to(dtype)
    y = T.int8_linear(x, cb, scb, bias, threshold)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    fmt = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    bits = x.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else x.numpy()
    bbits = bias.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else bias.numpy()
    want = I8.int8_linear_bits(bits.reshape(-1), fmt, 6, 40, cb.numpy().reshape(-1), scb.numpy(), 24, bbits, fmt,
                               threshold)  # fmt: skip
    got = y.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else y.numpy()
    np.testing.assert_array_equal(got.reshape(-1), want)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: T.int8_vectorwise_quant(np.ones((2, 2))), TypeError, "A must be a torch.Tensor"),
        (lambda: T.int8_vectorwise_quant(torch.ones(2, 2, dtype=torch.float64)), ValueError, "float32, float16"),
        (lambda: T.int8_vectorwise_quant(torch.ones(2, 2), threshold=-1), ValueError, "threshold must be a finite"),
        (lambda: T.int8_vectorwise_dequant(torch.ones(2, 2), torch.ones(2)), ValueError, "A must have dtype"),
        (
            lambda: T.int8_vectorwise_dequant(torch.ones(2, 2, dtype=torch.int8), torch.ones(3)),
            ValueError,
            "stats must have 2 elements",
        ),
        (lambda: T.int8_double_quant(torch.ones(2, 2), row_stats=torch.ones(2)), ValueError, "row_stats must be None"),
        (
            lambda: T.int8_linear_matmul(
                torch.ones(2, 2, dtype=torch.int8), torch.ones(2, 2, dtype=torch.int8), dtype=torch.float16
            ),  # fmt: skip
            ValueError,
            "dtype must be torch.int32",
        ),
        (
            lambda: T.int8_linear_matmul(torch.ones(2, 2, dtype=torch.int8), torch.ones(2, 3, dtype=torch.int8)),
            ValueError,
            "B must be 2-D",
        ),
        (
            lambda: T.int8_mm_dequant(torch.ones(2, 2, dtype=torch.int32), torch.ones(3), torch.ones(2)),
            ValueError,
            "row_stats must have 2 elements",
        ),
        (
            lambda: T.int8_mm_dequant(
                torch.ones(2, 2, dtype=torch.int32), torch.ones(2), torch.ones(2), dtype=torch.int8
            ),  # fmt: skip
            ValueError,
            "dtype must be float32, float16 or bfloat16",
        ),
        (
            lambda: T.int8_linear(torch.ones(2, 4), torch.ones(3, 4, dtype=torch.int8), torch.ones(2)),
            ValueError,
            "SCB must have 3 elements",
        ),
        (
            lambda: T.int8_linear(torch.ones(2, 4), torch.ones(3, 5, dtype=torch.int8), torch.ones(3)),
            ValueError,
            "CB must be 2-D",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_tensor_op_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------
# Int8Params
# ---------------------------------------------------------------------------------------
def test_int8params_quantizes_on_move_and_owns_cb_scb():
    d = fixture(0)
    p = T.Int8Params(d["fp_weight"].clone(), requires_grad=False, has_fp16_weights=False)
    assert not p.bnb_quantized and p.CB is None and p.SCB is None
    q = p.to("cpu")
    assert q is p and p.bnb_quantized and p.dtype == torch.int8 and not p.requires_grad
    assert p.CB.data_ptr() == p.data_ptr()  # CB is the data: one copy
    torch.testing.assert_close(p.data, d["module.weight"], rtol=0, atol=0)
    torch.testing.assert_close(p.SCB, d["module.SCB"], rtol=0, atol=0)
    # later moves carry the SCB and keep the codes
    moved = p.to("cpu")
    assert isinstance(moved, T.Int8Params) and moved.SCB is p.SCB and moved.dtype == torch.int8
    assert p.half() is p and p.float() is p and p.to(torch.float16).dtype == torch.int8
    p.CB = None  # accepted, nothing moves
    assert p.CB is not None


def test_int8params_fp16_weights_stay_float_and_trainable():
    w = torch.randn(4, 8)
    p = T.Int8Params(w.clone(), has_fp16_weights=True)
    q = p.to("cpu")
    assert isinstance(q, T.Int8Params) and q.dtype == torch.float32 and q.requires_grad and not q.bnb_quantized
    assert p.half().dtype == torch.float16


def test_int8params_copies_and_pickles():
    p = T.Int8Params(torch.randn(6, 16), requires_grad=False).cpu()
    c = copy.deepcopy(p)
    assert isinstance(c, T.Int8Params) and c.bnb_quantized and c.data_ptr() != p.data_ptr()
    torch.testing.assert_close(c.SCB, p.SCB)
    buf = io.BytesIO()
    torch.save(p, buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)
    assert isinstance(r, T.Int8Params) and torch.equal(r.data, p.data) and torch.equal(r.SCB, p.SCB)
    r2 = pickle.loads(pickle.dumps(p))
    assert torch.equal(r2.SCB, p.SCB)


def test_int8params_from_codes_and_errors():
    cb = torch.ones(3, 4, dtype=torch.int8)
    p = T.Int8Params(CB=cb, SCB=torch.ones(3), requires_grad=False)
    assert p.bnb_quantized and p.data_ptr() == cb.data_ptr()
    with pytest.raises(ValueError, match="requires_grad must be False for torch.int8"):
        T.Int8Params(cb, requires_grad=True)
    with pytest.raises(ValueError, match="SCB must have one float32 per row"):
        T.Int8Params(cb, requires_grad=False, SCB=torch.ones(2))
    with pytest.raises(ValueError, match="SCB describes int8 codes"):
        T.Int8Params(torch.ones(3, 4), requires_grad=False, SCB=torch.ones(3))
    with pytest.raises(TypeError, match="data must be a torch.Tensor"):
        T.Int8Params([1.0], requires_grad=False)
    with pytest.raises(ValueError, match="quantizes 2-D"):
        T.Int8Params(torch.ones(4), requires_grad=False).cpu()


# ---------------------------------------------------------------------------------------
# Linear8bitLt: fixtures, checkpoints, state
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, 6])
def test_linear8bitlt_reproduces_the_fixture(threshold):
    d = fixture(threshold)
    layer = layer_from_float(d, float(threshold)).cpu()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "SCB", "weight_format"}
    assert torch.equal(sd["weight"], d["module.weight"]) and torch.equal(sd["SCB"], d["module.SCB"])
    assert sd["weight_format"].dtype == torch.uint8 and sd["weight_format"].item() == 0
    y = layer(d["x"])
    assert y.dtype == torch.float16
    assert torch.equal(y, d["y"])
    assert layer.bias.dtype == torch.float32  # cast per call, never rewritten


@pytest.mark.parametrize("threshold", [0, 6])
def test_fixture_checkpoint_loads_into_a_fresh_layer(threshold):
    d = fixture(threshold)
    layer = T.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=float(threshold))
    assert not layer.weight.bnb_quantized
    result = layer.load_state_dict(module_entries(d))
    assert not result.missing_keys and not result.unexpected_keys
    assert layer.weight.bnb_quantized and torch.equal(layer.weight.data, d["module.weight"])
    assert torch.equal(layer(d["x"]), d["y"])
    # ... and round-trips through our own state_dict
    again = T.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=float(threshold))
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(d["x"]), d["y"])


def test_state_reads_cb_scb_from_the_weight():
    layer = layer_from_float(fixture(0), 0.0).cpu()
    st = layer.state
    assert st.CB.data_ptr() == layer.weight.data_ptr() and st.SCB is layer.weight.SCB
    # a weight swapped in later is seen at once
    layer.load_state_dict(module_entries(fixture(6)))
    assert torch.equal(layer.state.CB, fixture(6)["module.weight"])
    with pytest.raises(ValueError, match="tile_indices is no longer supported"):
        _ = layer.state.tile_indices
    with pytest.raises(TypeError, match="state must be a MatmulLtState"):
        layer.state = object()


def test_checkpoint_errors():
    d = module_entries(fixture(0))
    fp16_layer = T.Linear8bitLt(64, 32, has_fp16_weights=True)
    with pytest.raises(RuntimeError, match="has_fp16_weights=True"):
        fp16_layer.load_state_dict(d)
    layer = T.Linear8bitLt(64, 32, has_fp16_weights=False)
    with pytest.raises(RuntimeError, match="needs its SCB"):
        layer.load_state_dict({k: v for k, v in d.items() if k != "SCB"})
    with pytest.raises(RuntimeError, match="only the row-major int8 weight format"):
        layer.load_state_dict({**d, "weight_format": torch.tensor(3, dtype=torch.uint8)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        T.Linear8bitLt(64, 16, has_fp16_weights=False).load_state_dict({**d, "bias": torch.zeros(16)})
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"bias": d["bias"]})


def test_float_checkpoint_into_layers():
    lin = torch.nn.Linear(64, 32)
    quantized = T.Linear8bitLt(64, 32, has_fp16_weights=False).cpu()
    quantized.load_state_dict(lin.state_dict())
    want, _, _ = T.int8_vectorwise_quant(lin.weight.detach().half())
    assert quantized.weight.bnb_quantized and torch.equal(quantized.weight.data, want)
    fresh = T.Linear8bitLt(64, 32, has_fp16_weights=False)
    fresh.load_state_dict(lin.state_dict())
    assert not fresh.weight.bnb_quantized and torch.equal(fresh.weight.data, lin.weight.data)
    trainable = T.Linear8bitLt(64, 32)
    param = trainable.weight
    trainable.load_state_dict(lin.state_dict())
    assert trainable.weight is param and torch.equal(param.data, lin.weight.data)  # copied in place


def test_constructor_arguments():
    with pytest.warns(FutureWarning, match="memory_efficient_backward is deprecated"):
        T.Linear8bitLt(8, 4, memory_efficient_backward=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.Linear8bitLt(8, 4)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -1.0"):
        T.Linear8bitLt(8, 4, threshold=-1.0)
    layer = T.Linear8bitLt(8, 4, bias=False, has_fp16_weights=False, threshold=6.0, index=3)
    assert layer.bias is None and layer.index == 3 and layer.state.threshold == 6.0 and layer.state.use_pool
    assert isinstance(layer.weight, T.Int8Params) and not layer.weight.requires_grad


def test_first_forward_quantizes_an_unmoved_layer_and_deepcopy():
    d = fixture(6)
    layer = layer_from_float(d, 6.0)
    assert torch.equal(layer(d["x"]), d["y"])
    assert layer.weight.bnb_quantized
    twin = copy.deepcopy(layer)
    assert twin.state.CB.data_ptr() == twin.weight.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(twin(d["x"]), d["y"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear8bitlt_dtypes_and_leading_dims(dtype):
    torch.manual_seed(1)
    layer = T.Linear8bitLt(32, 16, has_fp16_weights=False, threshold=6.0).cpu()
    x = torch.randn(2, 5, 32).to(dtype)
    y = layer(x)
    assert y.shape == (2, 5, 16) and y.dtype == dtype
    assert torch.equal(layer(x.reshape(10, 32)).reshape(2, 5, 16), y)


# ---------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------
def test_matmul_gradients_with_fp16_weights():
    torch.manual_seed(2)
    x = torch.randn(32, 48, requires_grad=True)
    w = torch.randn(24, 48, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    y = T.matmul(x, w, bias=b, threshold=3.0)
    g = torch.randn_like(y)
    y.backward(g)
    cb, scb, _ = T.int8_vectorwise_quant(w.detach().half())
    w_deq = cb.float() * (scb / 127).unsqueeze(1)
    torch.testing.assert_close(x.grad, g @ w_deq)  # through the int8 weight
    torch.testing.assert_close(b.grad, g.sum(0))
    ref_w = g.t() @ x.detach()
    rel = (w.grad - ref_w).norm() / ref_w.norm()
    assert rel < 0.03  # int8 weight gradient
    exact = x.detach() @ w_deq.t() + b.detach()
    assert (y.detach() - exact).norm() / exact.norm() < 0.02  # int8 activations


def test_matmul_frozen_int8_weight_gives_input_gradient_only():
    layer = T.Linear8bitLt(16, 8, has_fp16_weights=False).cpu()
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is None and layer.bias.grad is not None


def test_matmul_state_and_out():
    w = torch.randn(8, 16)
    x = torch.randn(3, 16)
    state = T.MatmulLtState()
    out = torch.empty(3, 8)
    assert T.matmul(x, w, out=out, state=state, threshold=2.0) is out
    assert state.threshold == 2.0 and state.CB is not None and state.SCB.shape == (8,)
    state.reset_grads()
    assert state.CB is None
    with pytest.raises(ValueError, match="out= is not supported when gradients are recorded"):
        T.matmul(x.requires_grad_(), w, out=out)
    with pytest.raises(ValueError, match="A's last dimension must equal B's K = 16"):
        T.matmul(torch.randn(3, 15), w)
    with pytest.raises(ValueError, match="neither B.SCB nor state.SCB"):
        T.matmul(x.detach(), torch.ones(8, 16, dtype=torch.int8))


def _train(model: torch.nn.Module, steps: int = 60) -> list[float]:
    torch.manual_seed(3)
    x = torch.randn(256, 32)
    target = x[:, :8] * 0.5 + torch.relu(x[:, 8:16])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "layer_cls", [T.Linear8bitLt, T.SwitchBackLinearBnb, torch.nn.Linear], ids=lambda c: c.__name__
)
def test_small_model_trains(layer_cls):
    """Loss goes down as with nn.Linear (same init, same data, same optimizer)."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(layer_cls(32, 64), torch.nn.ReLU(), layer_cls(64, 8))
    torch.manual_seed(4)
    reference = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    losses, ref_losses = _train(model), _train(reference)
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 1.1 * ref_losses[-1]


def test_switchback_weight_gradient_is_16bit():
    torch.manual_seed(5)
    layer = T.SwitchBackLinearBnb(16, 8)
    x = torch.randn(10, 16, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(layer.weight.grad, g.t() @ x.detach())
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    w_deq = layer.state.CB.float() * (layer.state.SCB / 127).unsqueeze(1)
    torch.testing.assert_close(x.grad, g @ w_deq)


# ---------------------------------------------------------------------------------------
# outliers
# ---------------------------------------------------------------------------------------
def test_find_outlier_dims():
    torch.manual_seed(6)
    w = torch.randn(64, 32)
    w[:, 5] *= 20
    assert T.find_outlier_dims(w).tolist() == [5]
    assert T.find_outlier_dims(w, topk=2)[0].item() == 5
    assert T.find_outlier_dims(w, rdm=True, topk=3).shape == (3,)
    with pytest.raises(ValueError, match="rdm=True needs topk"):
        T.find_outlier_dims(w, rdm=True)


def test_outlier_tracer(fresh_tracer):
    with pytest.raises(RuntimeError, match="singleton"):
        T.OutlierTracer()
    assert T.OutlierTracer.get_instance() is fresh_tracer
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[2].weight[:, 11] *= 30
    with pytest.raises(T.OutlierTracerNotInitializedError, match="initialize"):
        fresh_tracer.get_outliers(model[0].weight)
    fresh_tracer.initialize(model)
    assert fresh_tracer.is_initialized() and len(fresh_tracer.hooks) == 2
    x = torch.randn(4, 16)
    x[:, 3] = 9.0
    model(x)
    assert 3 in fresh_tracer.get_outliers(model[0].weight).tolist()  # |x| > 6 in the first layer's input
    assert fresh_tracer.get_outliers(model[2].weight).tolist() == [11]  # from the weight
    assert fresh_tracer.get_outliers(torch.nn.Linear(2, 2).weight) is None
    model(x)  # a second pass over traced layers removes the hooks
    assert fresh_tracer.hooks == []


class _RoundingLinear(T.OutlierAwareLinear):
    def quantize_weight(self, w, outlier_idx):
        q = torch.round(w.detach() * 8) / 8
        if outlier_idx is not None and outlier_idx.numel():
            q[:, outlier_idx] = w.detach()[:, outlier_idx]
        return q

    def forward_with_outliers(self, x, outlier_idx):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_outlier_aware_linear(fresh_tracer):
    layer = _RoundingLinear(8, 4)
    with pytest.raises(T.OutlierTracerNotInitializedError, match="OutlierTracer.get_instance\\(\\).initialize"):
        layer(torch.randn(2, 8))
    model = torch.nn.Sequential(layer)
    fresh_tracer.initialize(model)
    x = torch.randn(2, 8)
    x[:, 2] = 10.0
    y = model(x)
    assert layer.is_quantized and 2 in layer.outlier_dim.tolist() and y.shape == (2, 4)
    with pytest.raises(NotImplementedError, match="forward_with_outliers"):
        T.OutlierAwareLinear(2, 2).forward_with_outliers(x, None)
    with pytest.raises(NotImplementedError, match="quantize_weight"):
        T.OutlierAwareLinear(2, 2).quantize_weight(x, None)


# ---------------------------------------------------------------------------------------
# GPU: the same layers on CUDA, against the CPU results
# ---------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.parametrize("threshold", [0, 6])
def test_gpu_fixture_and_cpu_parity(threshold):
    if not _cuda_available():
        pytest.skip("torch has no CUDA here")
    d = fixture(threshold)
    layer = layer_from_float(d, float(threshold)).cuda()
    assert layer.weight.is_cuda and layer.weight.SCB.is_cuda
    assert torch.equal(layer.weight.data.cpu(), d["module.weight"])
    assert torch.equal(layer(d["x"].cuda()).cpu(), d["y"])
    fresh = T.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=float(threshold)).cuda()
    fresh.load_state_dict(module_entries(d))
    assert fresh.weight.is_cuda and torch.equal(fresh(d["x"].cuda()).cpu(), d["y"])
    back = fresh.cpu()
    assert back.weight.SCB.device.type == "cpu" and torch.equal(back(d["x"]), d["y"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64, 300])  # 16 / 33 / 64: the medium-M path
def test_gpu_layer_matches_cpu(dtype, threshold, rows):
    if not _cuda_available():
        pytest.skip("torch has no CUDA here")
    torch.manual_seed(rows)
    layer = T.Linear8bitLt(512, 384, has_fp16_weights=False, threshold=threshold)
    layer.bias.data = layer.bias.data.to(dtype)
    cpu = copy.deepcopy(layer).cpu()
    gpu = layer.cuda()
    x = torch.randn(rows, 512).to(dtype)
    x[:, 17] *= 12
    assert torch.equal(gpu.weight.data.cpu(), cpu.weight.data)
    assert torch.equal(gpu(x.cuda()).cpu(), cpu(x))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 512])  # the gemv, the medium-M path and cuBLAS
def test_gpu_layer_in_a_cuda_graph(rows):
    if not _cuda_available():
        pytest.skip("torch has no CUDA here")
    torch.manual_seed(7)
    layer = T.Linear8bitLt(4096, 1024, has_fp16_weights=False, threshold=6.0).half().cuda()
    x = torch.randn(rows, 4096, dtype=torch.float16, device="cuda")
    x[:, 5] *= 10
    want = layer(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.gpu
def test_gpu_training():
    if not _cuda_available():
        pytest.skip("torch has no CUDA here")
    torch.manual_seed(8)
    model = torch.nn.Sequential(T.Linear8bitLt(32, 64), torch.nn.ReLU(), T.SwitchBackLinearBnb(64, 8)).cuda()
    x = torch.randn(256, 32, device="cuda")
    target = x[:, :8] * 0.5 + torch.relu(x[:, 8:16])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first
