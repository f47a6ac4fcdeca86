"""coredi_kernels qk-norm + RoPE (JiT's attention prologue): values and every gradient against float64 math written
out here — RMSNorm by hand, the rotation as a multiplication of complex channel pairs by e^{iθ} — on both backends
(the Triton kernels under the interpreter on CPU, see conftest.py), then layouts, the launchers' tiling and
reduction, registration (opcheck, torch.compile), the module, errors, and GPU tests at JiT-B and JiT-H head sizes.

Like every test_kernel_*.py this file imports nothing from coredi_fast (CI runs it where only coredi-kernels is
installed). What needs coredi_fast's JiT lives beside it: the oracle against JiT's own RMSNorm and `apply_rope`, and
the bf16 error budget against an eager JiT, in test_qk_norm_rope_vs_jit.py; `patch_jit(fuse_qk_rope=True)` in
test_patch_jit.py.

Shapes: B = 2, H = 3, T = 2 prefix tokens + a 5 x 5 grid = 27 (odd), Dh in {8, 20} (20 is not a power of two).
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import coredi_kernels
from coredi_kernels import QKNormRoPE, force_backend, qk_norm_rope
from coredi_kernels.qk_norm_rope import _kernels

EPS = 1e-6
TOLERANCES = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
BACKENDS = ["triton", "torch"]
B, H, PREFIX, GRID = 2, 3, 2, 5
T = PREFIX + GRID * GRID
WEIGHTS = ["weights", "no-weights"]


# ---------------------------------------------------------------------------------------------------------------
# The float64 oracle and inputs
# ---------------------------------------------------------------------------------------------------------------


def grid_tables(head_dim, grid=GRID, prefix=PREFIX, theta=10000.0):
    """JiT's 2D RoPE angles written out: prefix tokens angle 0; grid token (r, c) rotates pair j by r·θ_j for the
    first Dh/4 pairs and by c·θ_(j − Dh/4) for the rest, θ_i = theta^(−i / (Dh/4)). -> cos, sin (T, Dh/2) fp32."""
    quarter = head_dim // 4
    angles = torch.zeros(prefix + grid * grid, head_dim // 2, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for j in range(head_dim // 2):
                position, i = (r, j) if j < quarter else (c, j - quarter)
                angles[prefix + r * grid + c, j] = position * theta ** (-i / quarter)
    return angles.cos().float(), angles.sin().float()


def oracle(qkv, q_weight, k_weight, cos, sin, eps=EPS):
    """float64 q, k, v (B, H, T, Dh): x / sqrt(mean(x²) + eps) · w, then each pair (a, b) as a + ib times e^{iθ}."""
    q, k, v = qkv.double().unbind(2)
    outputs = []
    for x, weight in ((q, q_weight), (k, k_weight)):
        normed = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        if weight is not None:
            normed = normed * weight.double()
        if cos is not None:
            pairs = torch.view_as_complex(normed.unflatten(-1, (-1, 2)).contiguous())     # (B, T, H, Dh/2)
            turn = torch.complex(cos.double(), sin.double())[:, None, :]                 # (T, 1, Dh/2)
            normed = torch.view_as_real(pairs * turn).flatten(-2)
        outputs.append(normed.transpose(1, 2))
    return outputs[0], outputs[1], v.transpose(1, 2)


def make_inputs(head_dim, dtype=torch.float32, weights="weights", tokens=T, heads=H, batch=B, device="cpu",
                rope=True):
    """qkv (B, T, 3, H, Dh) with a non-zero mean, weights near 1 in qkv's dtype (or None), fp32 2D RoPE tables."""
    g = torch.Generator().manual_seed(batch * 1000 + tokens * 10 + head_dim)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=g) * 2 + 0.5
    inputs = {"qkv": qkv.to(device=device, dtype=dtype), "q_weight": None, "k_weight": None, "cos": None,
              "sin": None}
    if weights == "weights":
        for name in ("q_weight", "k_weight"):
            inputs[name] = (1 + 0.5 * torch.randn(head_dim, generator=g)).to(device=device, dtype=dtype)
    if rope:
        grid = math.isqrt(tokens - PREFIX)
        cos, sin = grid_tables(head_dim, grid=grid, prefix=tokens - grid * grid)
        inputs["cos"], inputs["sin"] = cos.to(device), sin.to(device)
    return inputs


def run(inputs, eps=EPS):
    return qk_norm_rope(*(inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")), eps)


def run_oracle(inputs, eps=EPS):
    return oracle(*(inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")), eps)


def grads(fn, inputs, cotangents):
    """d(Σ outputs·cotangents)/d(qkv, q_weight, k_weight) -> dict over the tensors present (tables get none)."""
    names = [k for k in ("qkv", "q_weight", "k_weight") if inputs[k] is not None]
    leaves = dict(inputs, **{k: inputs[k].detach().clone().requires_grad_(True) for k in names})
    outputs = fn(leaves)
    cots = [c.to(o.dtype) for o, c in zip(outputs, cotangents, strict=True)]
    return dict(zip(names, torch.autograd.grad(outputs, [leaves[k] for k in names], cots), strict=True))


def float64(inputs):
    return {k: v.detach().double() if v is not None else None for k, v in inputs.items()}


def cotangents_for(inputs, dtype=None):
    batch, tokens, _, heads, head_dim = inputs["qkv"].shape
    device = inputs["qkv"].device
    return [torch.randn(batch, heads, tokens, head_dim, device=device).to(dtype or inputs["qkv"].dtype)
            for _ in range(3)]


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def is_heads_first_view(t):
    """(B, H, T, Dh) laid out (B, T, H, Dh) in memory: what eager JiT passes to attention."""
    batch, heads, tokens, head_dim = t.shape
    return t.stride() == (tokens * heads * head_dim, head_dim, heads * head_dim, 1)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with force_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients, both backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("head_dim", [8, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_matches_oracle(backend, dtype, head_dim, weights):
    inputs = make_inputs(head_dim, dtype, weights)
    outputs = run(inputs)
    for name, got, want in zip("qkv", outputs, run_oracle(float64(inputs)), strict=True):
        assert got.dtype == dtype and got.shape == (B, H, T, head_dim), name
        assert is_heads_first_view(got), name
        assert_close(got, want, dtype, name)
    assert torch.equal(outputs[2], inputs["qkv"][:, :, 2].transpose(1, 2))  # v: an exact copy


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("head_dim", [8, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gradients_match_oracle(backend, dtype, head_dim, weights):
    inputs = make_inputs(head_dim, dtype, weights)
    cots = cotangents_for(inputs)
    got = grads(run, inputs, cots)
    want = grads(run_oracle, float64(inputs), [c.double() for c in cots])
    assert set(got) == ({"qkv", "q_weight", "k_weight"} if weights == "weights" else {"qkv"})
    for name, value in got.items():
        assert value.dtype == dtype and value.shape == inputs[name].shape, name
        assert_close(value, want[name], dtype, f"d{name}")


def test_one_weight_and_no_rope(backend):
    """Only q_weight (k_norm without affine), and qk-norm alone (cos = sin = None; any Dh, here odd)."""
    inputs = make_inputs(20)
    inputs["k_weight"] = None
    no_rope = make_inputs(7, rope=False)
    for case in (inputs, no_rope):
        cots = cotangents_for(case)
        for got, want in zip(run(case), run_oracle(float64(case)), strict=True):
            assert_close(got, want, torch.float32, "forward")
        got = grads(run, case, cots)
        want = grads(run_oracle, float64(case), [c.double() for c in cots])
        assert set(got) == {k for k in ("qkv", "q_weight", "k_weight") if case[k] is not None}
        for name, value in got.items():
            assert_close(value, want[name], torch.float32, f"d{name}")


def test_mixed_dtypes_as_under_autocast(backend):
    """Under autocast qkv is fp16/bf16 while the RMSNorm weights stay fp32 parameters and the tables fp32 buffers:
    outputs in qkv's dtype, each gradient in its input's dtype."""
    inputs = make_inputs(8)
    inputs["qkv"] = inputs["qkv"].half()
    cots = cotangents_for(inputs)
    for got, want in zip(run(inputs), run_oracle(float64(inputs)), strict=True):
        assert got.dtype == torch.float16
        assert_close(got, want, torch.float16, "forward")
    got = grads(run, inputs, cots)
    want = grads(run_oracle, float64(inputs), [c.double() for c in cots])
    assert [got[k].dtype for k in ("qkv", "q_weight", "k_weight")] == [torch.float16, torch.float32, torch.float32]
    for name, value in got.items():
        assert_close(value, want[name], torch.float16, f"d{name}")


def test_torch_backend_backward_passes_gradcheck():
    """The hand-written backward of the torch backend against finite differences (float64)."""
    inputs = float64(make_inputs(8, tokens=PREFIX + 4, heads=2))
    names = ("qkv", "q_weight", "k_weight")
    leaves = tuple(inputs[k].requires_grad_(True) for k in names)
    with force_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *tensors: qk_norm_rope(*tensors, inputs["cos"], inputs["sin"], EPS), leaves)


# ---------------------------------------------------------------------------------------------------------------
# Layouts, tiles and the two-stage reduction
# ---------------------------------------------------------------------------------------------------------------


def test_any_input_and_upstream_gradient_layout(backend):
    """qkv as a non-contiguous view, upstream gradients as SDPA may hand them: contiguous (B, H, T, Dh), the
    (B, T, H, Dh) view, a slice of a wider buffer, and a non-unit last stride."""
    inputs = make_inputs(20)
    qkv = inputs["qkv"]
    strided = dict(inputs, qkv=qkv.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4))
    assert not strided["qkv"].is_contiguous()
    cots = [
        torch.randn(B, H, T, 20).contiguous(),
        torch.randn(B, T, H, 20).transpose(1, 2),
        torch.randn(B, H, T, 40)[..., 10:30],
    ]
    for name, layout in (("slice", cots), ("transposed last dims", [torch.randn(B, H, 20, T).transpose(2, 3)] * 3)):
        got = grads(run, strided, layout)
        want = grads(run_oracle, float64(inputs), [c.double() for c in layout])
        for key, value in got.items():
            assert_close(value, want[key], torch.float32, f"{name}: d{key}")
    for got, want in zip(run(strided), run_oracle(float64(inputs)), strict=True):
        assert_close(got, want, torch.float32, "forward")


def test_outputs_reshape_for_attention_without_copies(backend):
    """The attention output has q's layout under cuDNN; with q laid out (B, T, H, Dh), the (B, T, H·Dh) view that
    feeds proj needs no copy — checked here on the op's outputs themselves."""
    q, k, v = run(make_inputs(8))
    for t in (q, k, v):
        tokens_first = t.transpose(1, 2)
        assert tokens_first.is_contiguous()
        assert tokens_first.reshape(B, T, H * 8).data_ptr() == t.data_ptr()


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("block_s, rows_per_program", [(4, 8), (1, 1), (8, 40)])
def test_launchers_with_tiles_across_parts_and_many_programs(weights, block_s, rows_per_program):
    """Tiles of block_s head rows straddle q/k/v and tokens (3H = 9 head rows per token); backward programs own
    rows_per_program head rows each (the last one partly masked), and the weight gradients are the sums of their
    partials."""
    inputs = make_inputs(20, weights=weights)
    args = [inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")]
    for got, want in zip(_kernels.qk_norm_rope_fwd(*args, EPS, block_s=block_s), run_oracle(float64(inputs)),
                         strict=True):
        assert_close(got, want, torch.float32, "forward")
    cots = cotangents_for(inputs)
    dqkv, dq_weight, dk_weight = _kernels.qk_norm_rope_bwd(*cots, *args, EPS, block_s=block_s,
                                                           rows_per_program=rows_per_program)
    want = grads(run_oracle, float64(inputs), [c.double() for c in cots])
    assert_close(dqkv, want["qkv"], torch.float32, "dqkv")
    if weights == "weights":
        assert_close(dq_weight, want["q_weight"], torch.float32, "dq_weight")
        assert_close(dk_weight, want["k_weight"], torch.float32, "dk_weight")
    else:
        assert dq_weight is None and dk_weight is None
    with pytest.raises(ValueError, match="multiple of block_s"):
        _kernels.qk_norm_rope_bwd(*cots, *args, EPS, block_s=4, rows_per_program=6)


def test_empty_batch(backend):
    inputs = make_inputs(8)
    inputs["qkv"] = inputs["qkv"][:0]
    cots = [torch.randn(0, H, T, 8) for _ in range(3)]
    assert [o.shape for o in run(inputs)] == [(0, H, T, 8)] * 3
    got = grads(run, inputs, cots)
    assert got["qkv"].shape == inputs["qkv"].shape and torch.equal(got["q_weight"], torch.zeros(8))


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, dispatch, module, errors, exports
# ---------------------------------------------------------------------------------------------------------------


def _op_cases():
    """(custom op, args): the forward (inputs that require grad) with and without weights and RoPE; the backward
    with contiguous and (B, T, H, Dh)-strided upstream gradients, with and without weights."""
    full = make_inputs(8)
    bare = make_inputs(8, weights="no-weights", rope=False)
    cases = []
    for inputs in (full, bare):
        args = [inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")]
        leaves = [a.clone().requires_grad_(True) if a is not None and i < 3 else a for i, a in enumerate(args)]
        cots = cotangents_for(inputs)
        cots[1] = cots[1].transpose(1, 2).contiguous().transpose(1, 2)
        cases += [(torch.ops.coredi.qk_norm_rope_fwd.default, (*leaves, EPS)),
                  (torch.ops.coredi.qk_norm_rope_bwd.default, (*cots, *args, EPS))]
    return cases


def test_opcheck(backend):
    for op, args in _op_cases():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    """One compiled attention (qkv linear -> qk_norm_rope -> SDPA -> proj) on CPU, torch backend: same values and
    gradients as eager."""
    dim, head_dim = H * 8, 8
    inputs = make_inputs(head_dim)
    x = torch.randn(B, T, dim)
    qkv_layer, proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def attention(x, q_weight, k_weight):
        qkv = qkv_layer(x).reshape(B, T, 3, H, head_dim)
        q, k, v = qk_norm_rope(qkv, q_weight, k_weight, inputs["cos"], inputs["sin"], EPS)
        return proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, dim))

    compiled = torch.compile(attention, fullgraph=True, dynamic=False)
    cot = torch.randn(B, T, dim)

    def outputs_and_grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, inputs["q_weight"], inputs["k_weight"])]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves + [qkv_layer.weight], cot)]

    with force_backend("torch"):
        eager, comp = outputs_and_grads(attention), outputs_and_grads(compiled)
    for got, want in zip(comp, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_backend_is_torch_on_cpu_and_triton_runs_the_kernels(monkeypatch):
    calls = []
    launcher = _kernels.qk_norm_rope_fwd
    monkeypatch.setattr(_kernels, "qk_norm_rope_fwd", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    inputs = make_inputs(8)
    with force_backend("auto"):
        auto = run(inputs)
    assert calls == []
    with force_backend("triton"):
        triton = run(inputs)
    assert calls == [1]
    for got, want in zip(triton, auto, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with force_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' was forced"):
        run(float64(inputs))  # float64 runs on the torch backend only


def test_module_owns_the_weights_and_equals_the_function():
    inputs = make_inputs(20)
    module = QKNormRoPE(20, eps=1e-5)
    assert [n for n, _ in module.named_parameters()] == ["q_weight", "k_weight"]
    assert torch.equal(module.q_weight, torch.ones(20)) and torch.equal(module.k_weight, torch.ones(20))
    assert QKNormRoPE(20, elementwise_affine=False).q_weight is None
    with torch.no_grad():
        module.q_weight.copy_(inputs["q_weight"])
        module.k_weight.copy_(inputs["k_weight"])
    for name in BACKENDS:
        with force_backend(name):
            for got, want in zip(module(inputs["qkv"], inputs["cos"], inputs["sin"]), run(inputs, eps=1e-5),
                                 strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    cots = cotangents_for(inputs)
    outputs = module(inputs["qkv"], inputs["cos"], inputs["sin"])
    torch.autograd.backward(outputs, cots)
    want = grads(lambda i: run_oracle(i, eps=1e-5), float64(inputs), [c.double() for c in cots])
    assert_close(module.q_weight.grad, want["q_weight"], torch.float32, "dq_weight")
    assert_close(module.k_weight.grad, want["k_weight"], torch.float32, "dk_weight")


def test_bad_inputs_raise_errors_naming_the_argument():
    inputs = make_inputs(8)
    qkv, w, cos, sin = inputs["qkv"], inputs["q_weight"], inputs["cos"], inputs["sin"]
    qkv_odd = torch.randn(B, T, 3, H, 6)
    cases = [
        (lambda: qk_norm_rope(qkv[:, :, :2], w, w, cos, sin), ValueError, "qkv must have shape"),
        (lambda: qk_norm_rope(qkv.flatten(3), w, w, cos, sin), ValueError, "qkv must have shape"),
        (lambda: qk_norm_rope(qkv.long(), w, w, cos, sin), TypeError, "qkv must be a floating-point"),
        (lambda: qk_norm_rope(qkv, w[:4], w, cos, sin), ValueError, "q_weight must have shape"),
        (lambda: qk_norm_rope(qkv, w, w.long(), cos, sin), TypeError, "k_weight must be a floating-point"),
        (lambda: qk_norm_rope(qkv, w, w, cos[:-1], sin), ValueError, r"cos must have shape \(T, Dh/2\)"),
        (lambda: qk_norm_rope(qkv, w, w, cos, sin[:, :2]), ValueError, r"sin must have shape \(T, Dh/2\)"),
        (lambda: qk_norm_rope(qkv, w, w, cos, None), ValueError, "cos and sin must both"),
        (lambda: qk_norm_rope(qkv, w, w, cos.long(), sin), TypeError, "cos must be a floating-point"),
        (lambda: qk_norm_rope(qkv_odd, None, None, cos[:, :3], sin[:, :3]), ValueError,
         "Dh = 6 must be divisible by 4"),
        (lambda: qk_norm_rope(torch.randn(B, T, 3, H, 7), None, None, cos, sin), ValueError, "divisible by 4"),
        (lambda: qk_norm_rope(qkv, w, w, cos, sin, eps=0.0), ValueError, "eps must be > 0"),
        (lambda: QKNormRoPE(0), ValueError, "head_dim"),
        (lambda: QKNormRoPE(8, eps=-1), ValueError, "eps"),
        (lambda: QKNormRoPE(16)(qkv, cos, sin), ValueError, "head_dim = 16"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            fn()


def test_public_api_is_exported():
    # coredi_kernels.qk_norm_rope is the function; the package of the same name is reached through the import system
    package = importlib.import_module("coredi_kernels.qk_norm_rope")
    assert set(package.__all__) == {"qk_norm_rope", "qk_layernorm_rope", "QKNormRoPE"}
    assert {"qk_norm_rope", "qk_layernorm_rope", "QKNormRoPE"} <= set(coredi_kernels.__all__)
    assert coredi_kernels.qk_norm_rope is qk_norm_rope and coredi_kernels.QKNormRoPE is QKNormRoPE
    assert coredi_kernels.qk_layernorm_rope is package.qk_layernorm_rope


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

# JiT-B/16 and JiT-H/16 heads at 256 px: 256 patches + 32 in-context tokens.
GPU_SHAPES = [(4, 32 + 256, 12, 64), (4, 32 + 256, 16, 80), (3, 2 + 49, 5, 20)]


@pytest.mark.gpu
@pytest.mark.parametrize("weights", WEIGHTS)
def test_gpu_fp32_matches_oracle_with_default_tiles(weights):
    batch, tokens, heads, head_dim = GPU_SHAPES[1]
    inputs = make_inputs(head_dim, weights=weights, tokens=tokens, heads=heads, batch=batch, device="cuda")
    cots = cotangents_for(inputs)
    for got, want in zip(run(inputs), run_oracle(float64(inputs)), strict=True):
        assert is_heads_first_view(got)
        assert_close(got, want, torch.float32, "forward")
    got = grads(run, inputs, cots)
    want = grads(run_oracle, float64(inputs), [c.double() for c in cots])
    for key, value in got.items():
        torch.testing.assert_close(value.double(), want[key], rtol=1e-4, atol=1e-3, msg=f"d{key} differs")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    inputs = make_inputs(64, torch.bfloat16, tokens=32 + 256, heads=12, batch=32, device="cuda")
    cots = cotangents_for(inputs)
    first, second = grads(run, inputs, cots), grads(run, inputs, cots)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.gpu
def test_gpu_opcheck_and_compile_with_sdpa():
    inputs = make_inputs(80, torch.bfloat16, tokens=2 + 49, heads=4, device="cuda")
    args = [inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")]
    leaves = [a.clone().requires_grad_(True) if i < 3 else a for i, a in enumerate(args)]
    torch.library.opcheck(torch.ops.coredi.qk_norm_rope_fwd.default, (*leaves, EPS))

    def attention(qkv, q_weight, k_weight):
        return F.scaled_dot_product_attention(*qk_norm_rope(qkv, q_weight, k_weight, args[3], args[4], EPS))

    eager = attention(*leaves)
    compiled = torch.compile(attention, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
