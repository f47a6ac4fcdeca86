"""coredi_kernels RMSNorm + adaLN modulate (+ gated residual): values and every gradient against float64 math,
and `patch_jit` (the fused ops swapped into a JiT) against the unpatched model.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny.
Each op is checked with both backends forced ("triton" and "torch"), with and without the RMSNorm weight;
GPU tests (bf16, real shapes) carry `gpu`. The float64 oracle is `reference.*_ref`, itself checked here against
an RMSNorm written out in the test (and `F.rms_norm`).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import coredi_kernels
from coredi_fast.models import create_model
from coredi_kernels import force_backend
from coredi_kernels._utils import row_tile_config
from coredi_kernels.patch import is_dit_patched, patch_dit, patch_jit, unpatch_dit
from coredi_kernels.rmsnorm_modulate import (
    GatedResidualRMSNormModulate,
    RMSNormModulate,
    _kernels,
    gated_residual_rmsnorm_modulate,
    reference,
    rmsnorm_modulate,
)

EPS = 1e-6
# (B, T, D): D not a power of two (1280 is JiT-H's width), tiny B·T, odd T, T = 1.
SHAPES = [(2, 3, 1280), (3, 5, 48), (1, 7, 100), (4, 1, 33)]
TOLERANCES = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
BACKENDS = ["triton", "torch"]
OPS = ["plain", "gated"]
WEIGHTS = ["weight", "no-weight"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(op, B, T, D, dtype, device="cpu", param_spread=1.0, with_weight=True):
    """Random inputs; each sample's modulation rows differ (offset by the sample index) so mixing them up shows."""
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + T * 10 + D)
    sample_offset = param_spread * torch.arange(B, dtype=torch.float32)[:, None]

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    inputs = {
        "x": rnd(B, T, D) * 2 + 0.5,
        "shift": rnd(B, D, std=0.5) + sample_offset,
        "scale": rnd(B, D, std=0.5) - 0.3 * sample_offset,
    }
    if with_weight:
        inputs["weight"] = 1 + rnd(D, std=0.5)
    if op == "gated":
        inputs["y"] = rnd(B, T, D)
        inputs["gate"] = rnd(B, D, std=0.5) + 0.5 * sample_offset
    return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


def run_op(op, inputs):
    """The op under test -> tuple of outputs: (out,) or (h, out)."""
    weight = inputs.get("weight")
    if op == "plain":
        return (rmsnorm_modulate(inputs["x"], inputs["shift"], inputs["scale"], weight, EPS),)
    return gated_residual_rmsnorm_modulate(
        inputs["x"], inputs["y"], inputs["gate"], inputs["shift"], inputs["scale"], weight, EPS
    )


def run_reference(op, inputs):
    """The reference formula on `inputs` (float64 inputs give the float64 oracle) -> tuple of outputs."""
    weight = inputs.get("weight")
    if op == "plain":
        return (reference.rmsnorm_modulate_ref(inputs["x"], inputs["shift"], inputs["scale"], weight, EPS),)
    return reference.gated_residual_rmsnorm_modulate_ref(
        inputs["x"], inputs["y"], inputs["gate"], inputs["shift"], inputs["scale"], weight, EPS
    )


def grads(fn, op, inputs, cotangents):
    """d(Σ outputs·cotangents)/d(every input), as a dict keyed like `inputs`."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    outputs = fn(op, leaves)
    cots = [c.to(o.dtype) for o, c in zip(outputs, cotangents, strict=True)]
    values = torch.autograd.grad(outputs, list(leaves.values()), cots)
    return dict(zip(leaves, values, strict=True))


def float64(inputs):
    return {k: v.detach().double() for k, v in inputs.items()}


def tile_spans_two_samples(M, T, block_m):
    return any(start // T != (min(start + block_m, M) - 1) // T for start in range(0, M, block_m))


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    with force_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------------------


def test_reference_matches_rmsnorm_written_out():
    """out[b, t, i] = x[b, t, i] / sqrt(Σ_j x[b, t, j]² / D + eps) · w[i] · (1 + scale[b, i]) + shift[b, i]."""
    inputs = float64(make_inputs("gated", 3, 5, 48, torch.float64))
    x, y, gate, shift, scale, w = (inputs[k] for k in ("x", "y", "gate", "shift", "scale", "weight"))
    expected = torch.empty_like(x)
    for b in range(3):
        for t in range(5):
            rms = (sum(v * v for v in x[b, t].tolist()) / 48 + EPS) ** 0.5
            expected[b, t] = x[b, t] / rms * w * (1 + scale[b]) + shift[b]
    torch.testing.assert_close(reference.rmsnorm_modulate_ref(x, shift, scale, w, EPS), expected, rtol=1e-12,
                               atol=1e-12)
    rms_norm = F.rms_norm(x, (48,), w, eps=EPS) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(rms_norm, expected, rtol=1e-12, atol=1e-12)

    h_expected = x + gate[:, None, :] * y
    h, out = reference.gated_residual_rmsnorm_modulate_ref(x, y, gate, shift, scale, None, EPS)
    torch.testing.assert_close(h, h_expected, rtol=0, atol=0)
    expected = F.rms_norm(h_expected, (48,), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_torch_backend_backward_formulas_pass_gradcheck():
    """The hand-written backward of the torch backend against finite differences (float64), weight included."""
    inputs = {k: v.requires_grad_(True) for k, v in float64(make_inputs("gated", 2, 3, 7, torch.float64)).items()}
    with force_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda x, s, c, w: rmsnorm_modulate(x, s, c, w, EPS),
            (inputs["x"], inputs["shift"], inputs["scale"], inputs["weight"]),
        )
        assert torch.autograd.gradcheck(
            lambda x, y, g, s, c, w: gated_residual_rmsnorm_modulate(x, y, g, s, c, w, EPS),
            tuple(inputs[k] for k in ("x", "y", "gate", "shift", "scale", "weight")),
        )


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients, both backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_reference(backend, op, dtype, shape, weight):
    inputs = make_inputs(op, *shape, dtype, with_weight=weight == "weight")
    outputs = run_op(op, inputs)
    expected = run_reference(op, float64(inputs))
    for name, got, want in zip(("h", "out")[-len(outputs):], outputs, expected, strict=True):
        assert got.dtype == dtype and got.shape == shape
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_reference(backend, op, dtype, shape, weight):
    inputs = make_inputs(op, *shape, dtype, with_weight=weight == "weight")
    cotangents = [torch.randn(shape).to(dtype) for _ in range(1 if op == "plain" else 2)]
    got = grads(lambda o, i: run_op(o, i), op, inputs, cotangents)
    want = grads(run_reference, op, float64(inputs), [c.double() for c in cotangents])
    assert set(got) == set(inputs)  # x, shift, scale (+ weight) (+ y, gate)
    for name in inputs:
        assert got[name].dtype == dtype and got[name].shape == inputs[name].shape, name
        # dweight sums over all B·T rows: its fp16 rounding grows with the row count
        tol_dtype = torch.float32 if dtype == torch.float32 else dtype
        assert_close(got[name], want[name], tol_dtype, f"d{name}")


def test_mixed_dtypes_as_under_autocast(backend):
    """A JiT under autocast: fp32 residual stream and RMSNorm weight, fp16 branch output and modulation rows.
    h and out stay fp32; each gradient comes back in its input's dtype."""
    inputs = make_inputs("gated", 2, 5, 48, torch.float32)
    for key in ("y", "gate", "shift", "scale"):
        inputs[key] = inputs[key].half()
    cots = [torch.randn(2, 5, 48), torch.randn(2, 5, 48)]
    outputs = run_op("gated", inputs)
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
    for got, want in zip(outputs, run_reference("gated", float64(inputs)), strict=True):
        assert_close(got, want, torch.float32, "forward")
    got = grads(lambda o, i: run_op(o, i), "gated", inputs, cots)
    want = grads(run_reference, "gated", float64(inputs), [c.double() for c in cots])
    for key, value in inputs.items():
        assert got[key].dtype == value.dtype, key
        assert_close(got[key], want[key], value.dtype, f"d{key}")


def test_float64_runs_on_the_torch_backend_and_triton_refuses_it():
    inputs = float64(make_inputs("plain", 2, 3, 16, torch.float64))
    with force_backend("auto"):
        out = run_op("plain", inputs)[0]
    torch.testing.assert_close(out, run_reference("plain", inputs)[0], rtol=1e-12, atol=1e-12)
    with force_backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        run_op("plain", inputs)


# ---------------------------------------------------------------------------------------------------------------
# Tiles that cross sample boundaries; backward programs that split a sample
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T, block_m", [(5, 4), (3, 8), (8, 4)], ids=["crossing", "tile-holds-3-samples", "aligned"])
def test_forward_launcher_with_tiles_across_samples(op, T, block_m):
    """Per-row modulation rows (row // T), whichever way the BLOCK_M-row tiles fall on the sample boundaries."""
    B, D = 3, 48
    assert tile_spans_two_samples(B * T, T, block_m) == (T % block_m != 0)
    inputs = make_inputs(op, B, T, D, torch.float32, param_spread=10.0)
    expected = run_reference(op, float64(inputs))
    if op == "plain":
        out, rstd = _kernels.rmsnorm_modulate_fwd(
            inputs["x"], inputs["weight"], inputs["shift"], inputs["scale"], EPS, block_m=block_m
        )
        outputs, normalized = (out,), inputs["x"]
    else:
        h, out, rstd = _kernels.gated_residual_rmsnorm_modulate_fwd(
            *(inputs[k] for k in ("x", "y", "gate", "weight", "shift", "scale")), EPS, block_m=block_m
        )
        outputs, normalized = (h, out), expected[0]
    for got, want in zip(outputs, expected, strict=True):
        assert_close(got, want, torch.float32, "forward")
    mean_square = normalized.double().square().mean(dim=-1)
    torch.testing.assert_close(rstd.double(), (mean_square + EPS).rsqrt(), rtol=1e-5, atol=1e-6)


def test_default_tiles_cross_samples_through_the_public_op():
    """With the heuristic BLOCK_M (not passed by the test), a tile spans several samples: values still right."""
    B, T, D = 16, 5, 48
    block_m = row_tile_config(D, _kernels.FWD_TILE_ELEMENTS).BLOCK_M
    assert T % block_m != 0 and tile_spans_two_samples(B * T, T, block_m)
    inputs = make_inputs("gated", B, T, D, torch.float32, param_spread=10.0)
    with force_backend("triton"):
        outputs = run_op("gated", inputs)
    for got, want in zip(outputs, run_reference("gated", float64(inputs)), strict=True):
        assert_close(got, want, torch.float32, "forward")


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("block_m, rows_per_program", [(2, 4), (1, 1), (4, 8)])
def test_backward_launcher_splits_samples_into_chunks(op, block_m, rows_per_program, weight):
    """Backward programs own `rows_per_program` rows of one sample (the last chunk partly masked); the per-sample
    parameter gradients are the sum of their partials, and dweight the sum over samples too."""
    B, T, D = 3, 7, 48
    inputs = make_inputs(op, B, T, D, torch.float32, param_spread=10.0, with_weight=weight == "weight")
    w = inputs.get("weight")
    dout, dh_in = torch.randn(B, T, D), torch.randn(B, T, D)
    want = grads(run_reference, op, float64(inputs), [dh_in.double(), dout.double()][-1 if op == "plain" else 0:])
    launch = dict(block_m=block_m, rows_per_program=rows_per_program)
    if op == "plain":
        _, rstd = reference.rmsnorm_modulate_fwd_torch(inputs["x"], w, inputs["shift"], inputs["scale"], EPS)
        dx, dweight, dshift, dscale = _kernels.rmsnorm_modulate_bwd(dout, inputs["x"], w, inputs["scale"], rstd,
                                                                    **launch)
        got = dict(x=dx, shift=dshift, scale=dscale)
    else:
        h, _, rstd = reference.gated_residual_rmsnorm_modulate_fwd_torch(
            *(inputs[k] for k in ("x", "y", "gate")), w, inputs["shift"], inputs["scale"], EPS
        )
        dx, dy, dgate, dweight, dshift, dscale = _kernels.gated_residual_rmsnorm_modulate_bwd(
            dout, dh_in, h, inputs["y"], inputs["gate"], w, inputs["scale"], rstd, **launch
        )
        got = dict(x=dx, y=dy, gate=dgate, shift=dshift, scale=dscale)
    if w is None:
        assert dweight is None
    else:
        got["weight"] = dweight
    assert set(got) == set(inputs)
    for name, value in got.items():
        assert_close(value, want[name], torch.float32, f"d{name}")


def test_gated_backward_without_upstream_gradient_of_h():
    """Only `out` is used: dh comes from the norm alone (the kernel's HAS_DH_IN=False path)."""
    inputs = make_inputs("gated", 2, 5, 48, torch.float32)
    dout = torch.randn(2, 5, 48)
    want = grads(lambda o, i: run_reference(o, i)[1:], "gated", float64(inputs), [dout.double()])
    for name in BACKENDS:
        with force_backend(name):
            got = grads(lambda o, i: run_op(o, i)[1:], "gated", inputs, [dout])
        for key in inputs:
            assert_close(got[key], want[key], torch.float32, f"{name}: d{key}")


def test_in_context_tokens_share_their_sample_modulation(backend):
    """JiT prepends L class tokens to the T patch tokens: the op sees T + L rows per sample, all modulated by the
    sample's row. Normalizing the two parts separately gives the same rows (RMSNorm is per token)."""
    B, L, T, D = 3, 4, 9, 40
    inputs = make_inputs("plain", B, L + T, D, torch.float32, param_spread=5.0)
    whole = run_op("plain", inputs)[0]
    parts = [run_op("plain", dict(inputs, x=inputs["x"][:, sl]))[0] for sl in (slice(0, L), slice(L, None))]
    torch.testing.assert_close(whole, torch.cat(parts, dim=1), rtol=1e-6, atol=1e-6)
    assert_close(whole, run_reference("plain", float64(inputs))[0], torch.float32, "out")


# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------


def test_non_contiguous_inputs_and_strided_parameters(backend):
    """x as a transposed view, modulation rows as `chunk` views of one adaLN output (row stride 6·D), a strided
    weight, and a non-contiguous upstream gradient."""
    B, T, D = 2, 5, 24
    inputs = make_inputs("gated", B, T, D, torch.float32)
    x = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    y = inputs["y"].transpose(1, 2).contiguous().transpose(1, 2)
    ada = torch.randn(B, 6 * D)
    shift, scale, gate = ada.chunk(6, dim=1)[:3]
    weight = torch.randn(2 * D)[::2]
    assert not x.is_contiguous() and shift.stride(0) == 6 * D and weight.stride(0) == 2
    strided = dict(x=x, y=y, gate=gate, shift=shift, scale=scale, weight=weight)
    dout = torch.randn(B, D, T).transpose(1, 2)
    dh_in = torch.randn(B, D, T).transpose(1, 2)
    for op in OPS:
        cots = [dout] if op == "plain" else [dh_in, dout]
        args = {k: v for k, v in strided.items() if op == "gated" or k not in ("y", "gate")}
        for got, want in zip(run_op(op, args), run_reference(op, float64(args)), strict=True):
            assert_close(got, want, torch.float32, f"{op} forward")
        got = grads(lambda o, i: run_op(o, i), op, args, cots)
        want = grads(run_reference, op, float64(args), [c.double() for c in cots])
        for key in args:
            assert_close(got[key], want[key], torch.float32, f"{op} d{key}")


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, module == functional
# ---------------------------------------------------------------------------------------------------------------


def _op_cases():
    inputs = make_inputs("gated", 2, 3, 16, torch.float32)
    x, y, gate, shift, scale, w = (inputs[k] for k in ("x", "y", "gate", "shift", "scale", "weight"))
    with force_backend("torch"):
        _, rstd = torch.ops.coredi.rmsnorm_modulate_fwd(x, w, shift, scale, EPS)
        h, _, hrstd = torch.ops.coredi.gated_residual_rmsnorm_modulate_fwd(x, y, gate, w, shift, scale, EPS)
    dout, dh_in = torch.randn_like(x), torch.randn_like(x)
    leaf = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    fwd, gated_fwd = torch.ops.coredi.rmsnorm_modulate_fwd.default, torch.ops.coredi.gated_residual_rmsnorm_modulate_fwd
    bwd, gated_bwd = torch.ops.coredi.rmsnorm_modulate_bwd.default, torch.ops.coredi.gated_residual_rmsnorm_modulate_bwd
    return [
        (fwd, (leaf["x"], leaf["weight"], leaf["shift"], leaf["scale"], EPS)),
        (fwd, (leaf["x"], None, leaf["shift"], leaf["scale"], EPS)),
        (gated_fwd.default, (leaf["x"], leaf["y"], leaf["gate"], leaf["weight"], leaf["shift"], leaf["scale"], EPS)),
        (gated_fwd.default, (leaf["x"], leaf["y"], leaf["gate"], None, leaf["shift"], leaf["scale"], EPS)),
        (bwd, (dout, x, w, scale, rstd)),
        (bwd, (dout, x, None, scale, rstd)),
        (gated_bwd.default, (dout, dh_in, h, y, gate, w, scale, hrstd)),
        (gated_bwd.default, (dout, None, h, y, gate, None, scale, hrstd)),
    ]


def test_opcheck(backend):
    for op, args in _op_cases():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    """One compiled function that uses both ops (CPU, torch backend): same values and gradients as eager."""

    def block(x, y, gate, shift, scale, weight):
        h, out = gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, weight, EPS)
        return h, rmsnorm_modulate(out * 2 + h, shift, scale, None, EPS)

    inputs = make_inputs("gated", 2, 3, 16, torch.float32)
    args = [inputs[k] for k in ("x", "y", "gate", "shift", "scale", "weight")]
    cots = [torch.randn(2, 3, 16), torch.randn(2, 3, 16)]
    compiled = torch.compile(block, fullgraph=True, dynamic=False)

    def run(fn):
        leaves = [a.clone().requires_grad_(True) for a in args]
        outputs = fn(*leaves)
        return outputs, torch.autograd.grad(outputs, leaves, cots)

    with force_backend("torch"):
        (eager_out, eager_grads), (comp_out, comp_grads) = run(block), run(compiled)
    for got, want in zip(comp_out + comp_grads, eager_out + eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(eager_out[0], run_reference("gated", float64(inputs))[0], torch.float32, "h")


def test_modules_equal_functional_forms_and_own_the_weight():
    inputs = make_inputs("gated", 2, 5, 40, torch.float32)
    x, y, gate, shift, scale, w = (inputs[k] for k in ("x", "y", "gate", "shift", "scale", "weight"))
    plain, gated = RMSNormModulate(40, eps=1e-5), GatedResidualRMSNormModulate(40)
    assert torch.equal(plain.weight, torch.ones(40)) and [n for n, _ in gated.named_parameters()] == ["weight"]
    assert RMSNormModulate(40, elementwise_affine=False).weight is None
    with torch.no_grad():
        plain.weight.copy_(w)
        gated.weight.copy_(w)
    for name in BACKENDS:
        with force_backend(name):
            torch.testing.assert_close(plain(x, shift, scale), rmsnorm_modulate(x, shift, scale, w, 1e-5), rtol=0,
                                       atol=0)
            for got, want in zip(gated(x, y, gate, shift, scale),
                                 gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, w), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    expected = reference.rmsnorm_modulate_ref(x.double(), shift.double(), scale.double(), w.double(), 1e-5)
    assert_close(plain(x, shift, scale), expected, torch.float32, "out")
    plain(x, shift, scale).sum().backward()
    want = grads(lambda o, i: (reference.rmsnorm_modulate_ref(i["x"], i["shift"], i["scale"], i["weight"], 1e-5),),
                 "plain", float64(dict(x=x, shift=shift, scale=scale, weight=w)), [torch.ones(2, 5, 40).double()])
    assert_close(plain.weight.grad, want["weight"], torch.float32, "dweight")


def test_auto_backend_is_torch_on_cpu_and_triton_runs_the_kernels(monkeypatch):
    calls = []
    launcher = _kernels.rmsnorm_modulate_fwd
    monkeypatch.setattr(_kernels, "rmsnorm_modulate_fwd", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    inputs = make_inputs("plain", 2, 3, 16, torch.float32)
    with force_backend("auto"):
        auto_out = run_op("plain", inputs)[0]
    assert calls == []
    with force_backend("triton"):
        triton_out = run_op("plain", inputs)[0]
    assert calls == [1]
    torch.testing.assert_close(triton_out, auto_out, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_errors_naming_the_argument():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    p, w = torch.randn(2, 8), torch.randn(8)
    cases = [
        (lambda: rmsnorm_modulate(torch.randn(6, 8), p, p), ValueError, "x must have shape"),
        (lambda: rmsnorm_modulate(x, torch.randn(2, 1, 8), p), ValueError, "shift must have shape"),
        (lambda: rmsnorm_modulate(x, p, torch.randn(3, 8)), ValueError, "scale must have shape"),
        (lambda: rmsnorm_modulate(x, p, p, torch.randn(4)), ValueError, "weight must have shape"),
        (lambda: rmsnorm_modulate(x, p, p, w.long()), TypeError, "weight must be a floating-point"),
        (lambda: rmsnorm_modulate(x.long(), p, p), TypeError, "x must be a floating-point"),
        (lambda: rmsnorm_modulate(x, p, p, eps=0.0), ValueError, "eps must be > 0"),
        (lambda: gated_residual_rmsnorm_modulate(x, y[:, :2], p, p, p), ValueError, "y must have x's shape"),
        (lambda: gated_residual_rmsnorm_modulate(x, y, p[:, :4], p, p, w), ValueError, "gate must have shape"),
        (lambda: gated_residual_rmsnorm_modulate(x, y, p, p, p, w[:3]), ValueError, "weight must have shape"),
        (lambda: RMSNormModulate(0), ValueError, "hidden_size"),
        (lambda: GatedResidualRMSNormModulate(8, eps=-1), ValueError, "eps"),
        (lambda: RMSNormModulate(8, elementwise_affine=1), TypeError, "elementwise_affine"),
        (lambda: RMSNormModulate(16)(x, p, p), ValueError, "hidden_size=16"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            fn()


# ---------------------------------------------------------------------------------------------------------------
# patch_jit: the fused ops in a JiT give the unpatched model's outputs and every gradient
# ---------------------------------------------------------------------------------------------------------------


def randomize_(model, std=0.1):
    """Random weights everywhere but the fixed position table (adaLN-Zero would otherwise zero every gate and hide
    mistakes); RMSNorm weights near 1."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model


def tiny_jit(**overrides):
    kwargs = dict(input_size=8, in_channels=3, feature_channels=2, num_classes=10)
    return randomize_(create_model("JiT-Micro/2", **{**kwargs, **overrides}))


def jit_inputs(model, batch=3):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, *model.input_shape, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, 10, (batch,), generator=g)


def outputs_and_grads(model, x, t, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x, t, y, force_drop_ids=torch.zeros_like(y))
    (out * torch.linspace(-1, 2, out.numel()).reshape(out.shape)).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


def assert_same(got, want, tol=None):
    tol = tol or {"atol": 2e-5, "rtol": 2e-5}
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, **tol)
    assert ref_out.abs().mean() > 1e-2
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref, **tol, msg=name)


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the coredi RMSNorm ops that run."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "rmsnorm_modulate" in name:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fuse_residual", [True, False], ids=["fuse-residual", "norms-only"])
@pytest.mark.parametrize("in_context_len", [2, 0], ids=["in-context", "no-in-context"])
def test_patched_jit_equals_unpatched(fuse_residual, in_context_len):
    model = tiny_jit(in_context_len=in_context_len)
    x, t, y = jit_inputs(model)
    want = outputs_and_grads(model, x, t, y)
    patched = patch_jit(copy.deepcopy(model), fuse_residual=fuse_residual)
    assert is_dit_patched(patched)
    with force_backend("torch"), OpCounter() as counter:
        got = outputs_and_grads(patched, x, t, y)
    assert_same(got, want)
    # Depth 2: five norm passes (norm1, norm2 per block, norm_final), each one op. With fuse_residual the residual
    # add inside each block is fused (2 gated ops), and across consumers (block 0 -> block 1 -> final layer) only
    # where the consumer sees the previous output as is: not with class tokens (inserted at block 1, cut before the
    # final layer).
    fused_fwd = counter.counts.get("coredi.gated_residual_rmsnorm_modulate_fwd", 0)
    plain_fwd = counter.counts.get("coredi.rmsnorm_modulate_fwd", 0)
    assert fused_fwd + plain_fwd == 5
    expected_fused = (2 + (2 if in_context_len == 0 else 0)) if fuse_residual else 0
    assert fused_fwd == expected_fused
    unpatch_dit(patched)
    assert_same(outputs_and_grads(patched, x, t, y), want, tol=dict(atol=0, rtol=0))


def test_patched_jit_with_grad_checkpointing_and_dropout_in_eval():
    model = tiny_jit(grad_checkpointing=True, proj_dropout=0.5)
    model.eval()  # dropout off; the label is kept through force_drop_ids
    x, t, y = jit_inputs(model)
    want = outputs_and_grads(model, x, t, y)
    got = outputs_and_grads(patch_jit(copy.deepcopy(model)), x, t, y)
    assert_same(got, want)


def test_patched_jit_triton_kernels_under_the_interpreter():
    model = tiny_jit()
    x, t, y = jit_inputs(model, batch=2)
    want = outputs_and_grads(model, x, t, y)
    with force_backend("triton"):
        got = outputs_and_grads(patch_jit(copy.deepcopy(model)), x, t, y)
    assert_same(got, want, tol=dict(atol=1e-4, rtol=1e-4))


def test_patch_jit_refuses_models_it_cannot_fuse():
    sit = create_model("SiT-Micro/2", input_size=8, num_classes=10)
    with pytest.raises(ValueError, match=r"model.blocks.0.norm1.*RMSNorm"):
        patch_jit(sit)
    jit = tiny_jit()
    with pytest.raises(ValueError, match=r"model.blocks.0.norm1.*patch_jit"):
        patch_dit(jit)
    del jit.final_layer.norm_final
    with pytest.raises(ValueError, match="model.final_layer.norm_final"):
        patch_jit(jit)
    assert not is_dit_patched(jit)
    with pytest.raises(TypeError, match="fuse_residual"):
        patch_jit(tiny_jit(), fuse_residual="yes")


def test_public_api_is_importable_from_the_package():
    from coredi_kernels.rmsnorm_modulate import __all__ as names

    assert set(names) == {"rmsnorm_modulate", "gated_residual_rmsnorm_modulate", "RMSNormModulate",
                          "GatedResidualRMSNormModulate"}
    assert coredi_kernels.force_backend is force_backend


# ---------------------------------------------------------------------------------------------------------------
# bf16: flash-attention's two-reference error budget (tiny on the CPU interpreter, real shapes on a GPU)
# ---------------------------------------------------------------------------------------------------------------


def _jit_formula(op, inputs):
    """What an unfused JiT block computes (RMSNorm in fp32 with its weight, back to the input dtype, then modulate
    in the input dtype)."""
    def norm_mod(h):
        hf = h.float()
        normed = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + EPS) * inputs["weight"].float()).to(h.dtype)
        return normed * (1 + inputs["scale"].unsqueeze(1)) + inputs["shift"].unsqueeze(1)

    if op == "plain":
        return (norm_mod(inputs["x"]),)
    h = inputs["x"] + inputs["gate"].unsqueeze(1) * inputs["y"]
    return h, norm_mod(h)


def check_bf16_error_budget(op, shape, device):
    """Our bf16 error against an fp32 reference must be <= 2x PyTorch's own bf16 error, plus a small atol."""
    inputs = make_inputs(op, *shape, torch.bfloat16, device=device)
    cots = [torch.randn(shape, device=device).bfloat16() for _ in range(1 if op == "plain" else 2)]
    fp32 = {k: v.float() for k, v in inputs.items()}
    ref_out = _jit_formula(op, fp32)
    ref_grads = grads(_jit_formula, op, fp32, [c.float() for c in cots])
    torch_out = _jit_formula(op, inputs)
    torch_grads = grads(_jit_formula, op, inputs, cots)
    ours_out = run_op(op, inputs)
    ours_grads = grads(lambda o, i: run_op(o, i), op, inputs, cots)

    def check(name, ours, theirs, ref):
        ours_err = (ours.float() - ref).abs().max().item()
        torch_err = (theirs.float() - ref).abs().max().item()
        atol = 1e-2 * max(1.0, ref.abs().max().item())
        assert ours_err <= 2 * torch_err + atol, f"{name}: ours {ours_err:.3g} vs torch {torch_err:.3g} (+{atol:.3g})"

    for name, ours, theirs, ref in zip(("h", "out")[-len(ours_out):], ours_out, torch_out, ref_out, strict=True):
        check(name, ours, theirs, ref)
    for name in inputs:
        check(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name])


@pytest.mark.parametrize("op", OPS)
def test_bf16_error_budget_interpreter(op):
    with force_backend("triton"):
        check_bf16_error_budget(op, (2, 3, 1280), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 288, 1280), (3, 77, 1280), (5, 33, 768)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS)
def test_gpu_bf16_error_budget(op, shape):
    check_bf16_error_budget(op, shape, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("op", OPS)
def test_gpu_fp32_matches_reference_with_default_tiles(op, weight):
    B, T, D = 6, 77, 1280  # 77 rows per sample: default tiles cross sample boundaries
    block_m = row_tile_config(D, _kernels.FWD_TILE_ELEMENTS).BLOCK_M
    assert block_m == 1 or tile_spans_two_samples(B * T, T, block_m)
    inputs = make_inputs(op, B, T, D, torch.float32, device="cuda", param_spread=10.0,
                         with_weight=weight == "weight")
    cots = [torch.randn(B, T, D, device="cuda") for _ in range(1 if op == "plain" else 2)]
    for got, want in zip(run_op(op, inputs), run_reference(op, float64(inputs)), strict=True):
        assert_close(got, want, torch.float32, "forward")
    got = grads(lambda o, i: run_op(o, i), op, inputs, cots)
    want = grads(run_reference, op, float64(inputs), [c.double() for c in cots])
    for key in inputs:
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-4, atol=1e-3, msg=f"d{key} differs")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_backward_is_deterministic(op):
    inputs = make_inputs(op, 64, 288, 1280, torch.bfloat16, device="cuda")
    cots = [torch.randn(64, 288, 1280, device="cuda").bfloat16() for _ in range(1 if op == "plain" else 2)]
    first = grads(lambda o, i: run_op(o, i), op, inputs, cots)
    second = grads(lambda o, i: run_op(o, i), op, inputs, cots)
    for key in inputs:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_patched_jit_under_autocast():
    inputs = make_inputs("gated", 2, 9, 1280, torch.bfloat16, device="cuda")
    args = [inputs[k].requires_grad_(True) for k in ("x", "y", "gate", "weight", "shift", "scale")]
    torch.library.opcheck(torch.ops.coredi.gated_residual_rmsnorm_modulate_fwd.default, (*args, EPS))
    torch.library.opcheck(torch.ops.coredi.rmsnorm_modulate_fwd.default, (args[0], args[3], args[4], args[5], EPS))

    def block(x, y, gate, weight, shift, scale):
        h, out = gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, weight, EPS)
        return rmsnorm_modulate(out + h, shift, scale, weight, EPS)

    eager = block(*args)
    compiled = torch.compile(block, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)

    model = tiny_jit(input_size=32, hidden_size=128, num_heads=4).cuda()
    x, t, y = (v.cuda() for v in jit_inputs(model, batch=4))
    patched = patch_jit(copy.deepcopy(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(x, t, y, force_drop_ids=torch.zeros_like(y)).float()
        got = patched(x, t, y, force_drop_ids=torch.zeros_like(y)).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
