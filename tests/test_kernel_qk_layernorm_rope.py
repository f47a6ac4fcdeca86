"""coredi_kernels.qk_layernorm_rope (qk-norm as a per-head LayerNorm with weight and bias, then RoPE — the qk-norm of
timm's Attention, REPA's and LightningDiT's LayerNorm models): values and every gradient against float64 math
written out here (mean, variance, the rotation as complex multiplication by e^{iθ}) on both backends (the Triton
kernels under the interpreter on CPU), the launchers' tiling and reduction, registration (opcheck), the match with
`nn.LayerNorm` modules followed by a rotary module, and errors. The RMSNorm form is tested in
test_kernel_qk_norm_rope.py; like every test_kernel_*.py this file imports nothing from coredi_fast.

Shapes: B = 2, H = 2, T = 2 prefix tokens + a 3 x 3 grid = 11, Dh in {8, 20} (20 is not a power of two).
"""
import pytest
import torch
import torch.nn as nn

from coredi_kernels import force_backend, qk_layernorm_rope
from coredi_kernels.qk_norm_rope import _kernels, reference

EPS = 1e-5
B, H, PREFIX, GRID = 2, 2, 2, 3
T = PREFIX + GRID * GRID
TOL = dict(atol=3e-5, rtol=3e-5)
PARAMS = {"affine": ("q_weight", "q_bias", "k_weight", "k_bias"), "weights only": ("q_weight", "k_weight"),
          "none": ()}
NAMES = ("qkv", "q_weight", "q_bias", "k_weight", "k_bias", "cos", "sin")


def tables(head_dim, theta=10000.0):
    """2D RoPE angles: prefix tokens 0; grid token (r, c) turns pair j by r·θ_j (j < Dh/4), else c·θ_(j − Dh/4)."""
    quarter = head_dim // 4
    angles = torch.zeros(T, head_dim // 2, dtype=torch.float64)
    for r in range(GRID):
        for c in range(GRID):
            for j in range(head_dim // 2):
                position, i = (r, j) if j < quarter else (c, j - quarter)
                angles[PREFIX + r * GRID + c, j] = position * theta ** (-i / quarter)
    return angles.cos().float(), angles.sin().float()


def make_inputs(head_dim, params="affine", rope=True):
    g = torch.Generator().manual_seed(head_dim)
    inputs = dict.fromkeys(NAMES)
    inputs["qkv"] = torch.randn(B, T, 3, H, head_dim, generator=g) * 2 + 0.5  # a non-zero mean to centre
    for name in PARAMS[params]:
        inputs[name] = (1.0 if "weight" in name else 0.0) + 0.5 * torch.randn(head_dim, generator=g)
    if rope:
        inputs["cos"], inputs["sin"] = tables(head_dim)
    return inputs


def oracle(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, eps=EPS):
    """float64: (x − mean)/sqrt(var + eps)·w + b per head row, each channel pair (a, b) as a + ib times e^{iθ}."""
    q, k, v = qkv.double().unbind(2)
    outputs = []
    for x, weight, bias in ((q, q_weight, q_bias), (k, k_weight, k_bias)):
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps)
        y = y * weight.double() if weight is not None else y
        y = y + bias.double() if bias is not None else y
        if cos is not None:
            pairs = torch.view_as_complex(y.unflatten(-1, (-1, 2)).contiguous())
            y = torch.view_as_real(pairs * torch.complex(cos.double(), sin.double())[:, None, :]).flatten(-2)
        outputs.append(y.transpose(1, 2))
    return outputs[0], outputs[1], v.transpose(1, 2)


def grads(fn, inputs, cotangents):
    """d(Σ outputs·cotangents)/d(qkv and each parameter present)."""
    names = [k for k in NAMES[:5] if inputs[k] is not None]
    leaves = dict(inputs, **{k: inputs[k].detach().clone().requires_grad_(True) for k in names})
    outputs = fn(*(leaves[k] for k in NAMES))
    cots = [c.to(o.dtype) for o, c in zip(outputs, cotangents, strict=True)]
    return dict(zip(names, torch.autograd.grad(outputs, [leaves[k] for k in names], cots), strict=True))


def float64(inputs):
    return {k: v.double() if v is not None else None for k, v in inputs.items()}


def cotangents(head_dim):
    g = torch.Generator().manual_seed(99)
    return [torch.randn(B, H, T, head_dim, generator=g) for _ in range(3)]


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    with force_backend(request.param):
        yield request.param


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("head_dim", [8, 20])
def test_values_and_every_gradient_match_the_float64_oracle(backend, head_dim, params):
    inputs = make_inputs(head_dim, params)
    for got, want, name in zip(qk_layernorm_rope(*(inputs[k] for k in NAMES), EPS), oracle(*float64(inputs).values()),
                               "qkv", strict=True):
        torch.testing.assert_close(got.double(), want, **TOL, msg=name)
    cots = cotangents(head_dim)
    got = grads(lambda *a: qk_layernorm_rope(*a, EPS), inputs, cots)
    want = grads(oracle, float64(inputs), [c.double() for c in cots])
    assert got.keys() == want.keys() == {"qkv", *PARAMS[params]}
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], **TOL, msg=name)


def test_no_rope_and_the_reference_function(backend):
    inputs = make_inputs(8, rope=False)
    want = oracle(*float64(inputs).values())
    got = qk_layernorm_rope(*(inputs[k] for k in NAMES), EPS)
    ref = reference.qk_norm_rope_ref(inputs["qkv"], inputs["q_weight"], inputs["k_weight"], None, None, EPS,
                                     q_bias=inputs["q_bias"], k_bias=inputs["k_bias"], layer_norm=True)
    for a, b, w in zip(got, ref, want, strict=True):
        torch.testing.assert_close(a.double(), w, **TOL)
        torch.testing.assert_close(b.double(), w, **TOL)


def test_torch_backend_backward_passes_gradcheck():
    inputs = {k: (v.double().requires_grad_(k in NAMES[:5]) if v is not None else None)
              for k, v in make_inputs(8).items()}
    with force_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: qk_layernorm_rope(*a, EPS), tuple(inputs[k] for k in NAMES))


@pytest.mark.parametrize("block_s, rows_per_program", [(4, 8), (16, 16)])
def test_launchers_with_tiles_across_parts_and_many_programs(block_s, rows_per_program):
    """Tiles straddle q/k/v and tokens (3H = 6 head rows per token); each backward program owns rows_per_program
    head rows and writes weight and bias partials, summed by the launcher."""
    inputs = make_inputs(20)
    qkv, qw, qb, kw, kb, cos, sin = (inputs[k] for k in NAMES)
    got = _kernels.qk_norm_rope_fwd(qkv, qw, kw, cos, sin, EPS, block_s=block_s, q_bias=qb, k_bias=kb,
                                    layer_norm=True)
    for a, w in zip(got, oracle(*float64(inputs).values()), strict=True):
        torch.testing.assert_close(a.double(), w, **TOL)
    cots = cotangents(20)
    dqkv, dqw, dkw, dqb, dkb = _kernels.qk_layernorm_rope_bwd(*cots, qkv, qw, qb, kw, kb, cos, sin, EPS,
                                                               block_s=block_s, rows_per_program=rows_per_program)
    want = grads(oracle, float64(inputs), [c.double() for c in cots])
    for name, g in dict(qkv=dqkv, q_weight=dqw, q_bias=dqb, k_weight=dkw, k_bias=dkb).items():
        torch.testing.assert_close(g.double(), want[name], **TOL, msg=name)


def test_equals_layernorm_modules_and_a_rotary_module(backend):
    """What a timm-style attention computes: nn.LayerNorm(Dh) on q and k (B, H, T, Dh), then q·cos + rotate(q)·sin
    with cos/sin repeated over each channel pair."""
    Dh = 8
    inputs = make_inputs(Dh)
    q_norm, k_norm = nn.LayerNorm(Dh, eps=EPS), nn.LayerNorm(Dh, eps=EPS)
    with torch.no_grad():
        for norm, prefix in ((q_norm, "q"), (k_norm, "k")):
            norm.weight.copy_(inputs[f"{prefix}_weight"])
            norm.bias.copy_(inputs[f"{prefix}_bias"])
    cos, sin = inputs["cos"].repeat_interleave(2, dim=-1), inputs["sin"].repeat_interleave(2, dim=-1)  # (T, Dh)

    def rope(x):
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return x * cos + torch.stack((-b, a), dim=-1).flatten(-2) * sin

    q, k, v = inputs["qkv"].permute(2, 0, 3, 1, 4)
    got = qk_layernorm_rope(inputs["qkv"], q_norm.weight, q_norm.bias, k_norm.weight, k_norm.bias, inputs["cos"],
                            inputs["sin"], EPS)
    for a, w in zip(got, (rope(q_norm(q)), rope(k_norm(k)), v), strict=True):
        torch.testing.assert_close(a, w, **TOL)


def test_opcheck():
    full, bare = make_inputs(8), make_inputs(8, "none", rope=False)
    for inputs in (full, bare):
        args = [inputs[k] for k in NAMES]
        leaves = [a.clone().requires_grad_(True) if a is not None and i < 5 else a for i, a in enumerate(args)]
        with force_backend("torch"):
            torch.library.opcheck(torch.ops.coredi.qk_layernorm_rope_fwd.default, (*leaves, EPS))
            torch.library.opcheck(torch.ops.coredi.qk_layernorm_rope_bwd.default, (*cotangents(8), *args, EPS))


def test_bad_inputs_raise_errors_naming_the_argument():
    inputs = make_inputs(8)
    inputs["k_bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"qk_layernorm_rope: k_bias must have shape \(Dh,\) = \(8,\)"):
        qk_layernorm_rope(*(inputs[k] for k in NAMES), EPS)
    inputs = make_inputs(8)
    with pytest.raises(ValueError, match="qk_layernorm_rope: eps must be > 0"):
        qk_layernorm_rope(*(inputs[k] for k in NAMES), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, TOL), (torch.bfloat16, dict(atol=5e-2, rtol=5e-2))],
                         ids=["float32", "bfloat16"])
def test_gpu_default_tiles_match_the_oracle(dtype, tol):
    """The launchers' own tiles and program counts on a GPU, at a LightningDiT/REPA-XL head size (Dh = 72)."""
    inputs = {k: v.cuda() if v is not None else None for k, v in make_inputs(72).items()}
    inputs["qkv"] = inputs["qkv"].to(dtype)
    cots = [c.cuda().to(dtype) for c in cotangents(72)]
    with force_backend("triton"):
        got = qk_layernorm_rope(*(inputs[k] for k in NAMES), EPS)
        got_grads = grads(lambda *a: qk_layernorm_rope(*a, EPS), inputs, cots)
    want = oracle(*float64(inputs).values())
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), w, **tol)
    want_grads = grads(oracle, float64(inputs), [c.double() for c in cots])
    for name in want_grads:
        torch.testing.assert_close(got_grads[name].double(), want_grads[name], **tol, msg=name)
