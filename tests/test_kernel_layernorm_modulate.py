"""coredi_kernels LayerNorm + adaLN modulate (+ gated residual): values and every gradient against float64 math.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny.
Each op is checked with both backends forced ("triton" and "torch"); GPU tests (bf16, real shapes) carry `gpu`.
The float64 oracle is `reference.*_ref`, itself checked here against `F.layer_norm`.
"""
import pytest
import torch
import torch.nn.functional as F

import coredi_kernels
from coredi_kernels import (
    GatedResidualLayerNormModulate,
    LayerNormModulate,
    force_backend,
    gated_residual_layernorm_modulate,
    layernorm_modulate,
)
from coredi_kernels import backend as backend_mod
from coredi_kernels._utils import row_tile_config
from coredi_kernels.layernorm_modulate import _kernels, reference

EPS = 1e-6
# (B, T, D): D not a power of two (1152 is SiT-XL's width) with tiny B·T, odd T, T = 1.
SHAPES = [(2, 3, 1152), (3, 5, 48), (1, 7, 100), (4, 1, 33)]
TOLERANCES = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
BACKENDS = ["triton", "torch"]
OPS = ["plain", "gated"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(op, B, T, D, dtype, device="cpu", param_spread=1.0):
    """Random inputs; each sample's modulation rows differ (offset by the sample index) so mixing them up shows."""
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + T * 10 + D)
    sample_offset = param_spread * torch.arange(B, dtype=torch.float32)[:, None]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device)

    inputs = {
        "x": rnd(B, T, D) * 2 + 0.5,
        "shift": rnd(B, D, std=0.5) + sample_offset.to(device),
        "scale": rnd(B, D, std=0.5) - 0.3 * sample_offset.to(device),
    }
    if op == "gated":
        inputs["y"] = rnd(B, T, D)
        inputs["gate"] = rnd(B, D, std=0.5) + 0.5 * sample_offset.to(device)
    return {k: v.to(dtype) for k, v in inputs.items()}


def run_op(op, inputs):
    """The op under test -> tuple of outputs: (out,) or (h, out)."""
    if op == "plain":
        return (layernorm_modulate(inputs["x"], inputs["shift"], inputs["scale"], EPS),)
    return gated_residual_layernorm_modulate(
        inputs["x"], inputs["y"], inputs["gate"], inputs["shift"], inputs["scale"], EPS
    )


def run_reference(op, inputs):
    """The float64 reference on float64 copies of `inputs` -> tuple of outputs in float64."""
    if op == "plain":
        return (reference.layernorm_modulate_ref(inputs["x"], inputs["shift"], inputs["scale"], EPS),)
    return reference.gated_residual_layernorm_modulate_ref(
        inputs["x"], inputs["y"], inputs["gate"], inputs["shift"], inputs["scale"], EPS
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


def test_reference_matches_f_layer_norm():
    inputs = float64(make_inputs("gated", 3, 5, 48, torch.float64))
    x, y, gate, shift, scale = (inputs[k] for k in ("x", "y", "gate", "shift", "scale"))
    expected = F.layer_norm(x, (48,), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(reference.layernorm_modulate_ref(x, shift, scale, EPS), expected, rtol=1e-12, atol=1e-12)

    h_expected = x + gate[:, None, :] * y
    h, out = reference.gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, EPS)
    torch.testing.assert_close(h, h_expected, rtol=0, atol=0)
    expected = F.layer_norm(h_expected, (48,), eps=EPS) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_torch_backend_backward_formulas_pass_gradcheck():
    """The hand-written backward of the torch backend against finite differences (float64)."""
    inputs = {k: v.requires_grad_(True) for k, v in float64(make_inputs("gated", 2, 3, 7, torch.float64)).items()}
    with force_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda x, s, c: layernorm_modulate(x, s, c, EPS), (inputs["x"], inputs["shift"], inputs["scale"])
        )
        assert torch.autograd.gradcheck(
            lambda x, y, g, s, c: gated_residual_layernorm_modulate(x, y, g, s, c, EPS),
            tuple(inputs[k] for k in ("x", "y", "gate", "shift", "scale")),
        )


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients, both backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_reference(backend, op, dtype, shape):
    inputs = make_inputs(op, *shape, dtype)
    outputs = run_op(op, inputs)
    expected = run_reference(op, float64(inputs))
    for name, got, want in zip(("h", "out")[-len(outputs):], outputs, expected, strict=True):
        assert got.dtype == dtype and got.shape == shape
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_reference(backend, op, dtype, shape):
    inputs = make_inputs(op, *shape, dtype)
    cotangents = [torch.randn(shape).to(dtype) for _ in range(1 if op == "plain" else 2)]
    got = grads(lambda o, i: run_op(o, i), op, inputs, cotangents)
    want = grads(run_reference, op, float64(inputs), [c.double() for c in cotangents])
    assert set(got) == set(inputs)  # x, shift, scale (+ y, gate)
    for name in inputs:
        assert got[name].dtype == dtype and got[name].shape == inputs[name].shape, name
        assert_close(got[name], want[name], dtype, f"d{name}")


def test_mixed_dtypes_as_under_autocast(backend):
    """A DiT under autocast: fp32 residual stream, fp16 branch output and modulation rows. h and out stay fp32;
    each gradient comes back in its input's dtype."""
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
        out = layernorm_modulate(inputs["x"], inputs["shift"], inputs["scale"], EPS)
    torch.testing.assert_close(out, run_reference("plain", inputs)[0], rtol=1e-12, atol=1e-12)
    with force_backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        layernorm_modulate(inputs["x"], inputs["shift"], inputs["scale"], EPS)


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
        out, mean, rstd = _kernels.layernorm_modulate_fwd(
            inputs["x"], inputs["shift"], inputs["scale"], EPS, block_m=block_m
        )
        outputs, normalized = (out,), inputs["x"]
    else:
        h, out, mean, rstd = _kernels.gated_residual_layernorm_modulate_fwd(
            *(inputs[k] for k in ("x", "y", "gate", "shift", "scale")), EPS, block_m=block_m
        )
        outputs, normalized = (h, out), expected[0]
    for got, want in zip(outputs, expected, strict=True):
        assert_close(got, want, torch.float32, "forward")
    var, mu = torch.var_mean(normalized.double(), dim=-1, correction=0)
    torch.testing.assert_close(mean.double(), mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + EPS).rsqrt(), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("block_m, rows_per_program", [(2, 4), (1, 1), (4, 8)])
def test_backward_launcher_splits_samples_into_chunks(op, block_m, rows_per_program):
    """Backward programs own `rows_per_program` rows of one sample (the last chunk partly masked); the per-sample
    parameter gradients are the sum of their partials."""
    B, T, D = 3, 7, 48
    inputs = make_inputs(op, B, T, D, torch.float32, param_spread=10.0)
    dout, dh_in = torch.randn(B, T, D), torch.randn(B, T, D)
    want = grads(run_reference, op, float64(inputs), [dh_in.double(), dout.double()][-1 if op == "plain" else 0:])
    launch = dict(block_m=block_m, rows_per_program=rows_per_program)
    if op == "plain":
        _, mean, rstd = reference.layernorm_modulate_fwd_torch(inputs["x"], inputs["shift"], inputs["scale"], EPS)
        dx, dshift, dscale = _kernels.layernorm_modulate_bwd(dout, inputs["x"], inputs["scale"], mean, rstd, **launch)
        got = dict(x=dx, shift=dshift, scale=dscale)
    else:
        h, _, mean, rstd = reference.gated_residual_layernorm_modulate_fwd_torch(
            *(inputs[k] for k in ("x", "y", "gate", "shift", "scale")), EPS
        )
        dx, dy, dgate, dshift, dscale = _kernels.gated_residual_layernorm_modulate_bwd(
            dout, dh_in, h, inputs["y"], inputs["gate"], inputs["scale"], mean, rstd, **launch
        )
        got = dict(x=dx, y=dy, gate=dgate, shift=dshift, scale=dscale)
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


# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------


def test_non_contiguous_inputs_and_strided_parameters(backend):
    """x as a transposed view, modulation rows as `chunk` views of one adaLN output (row stride 6·D), and a
    non-contiguous upstream gradient."""
    B, T, D = 2, 5, 24
    inputs = make_inputs("gated", B, T, D, torch.float32)
    x = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    y = inputs["y"].transpose(1, 2).contiguous().transpose(1, 2)
    ada = torch.randn(B, 6 * D)
    shift, scale, gate = ada.chunk(6, dim=1)[:3]
    assert not x.is_contiguous() and shift.stride(0) == 6 * D
    strided = dict(x=x, y=y, gate=gate, shift=shift, scale=scale)
    dout = torch.randn(B, D, T).transpose(1, 2)
    dh_in = torch.randn(B, D, T).transpose(1, 2)
    for op in OPS:
        cots = [dout] if op == "plain" else [dh_in, dout]
        args = {k: v for k, v in strided.items() if op == "gated" or k in ("x", "shift", "scale")}
        got_out = run_op(op, args)
        want_out = run_reference(op, float64(args))
        for got, want in zip(got_out, want_out, strict=True):
            assert_close(got, want, torch.float32, f"{op} forward")
        got = grads(lambda o, i: run_op(o, i), op, args, cots)
        want = grads(run_reference, op, float64(args), [c.double() for c in cots])
        for key in args:
            assert_close(got[key], want[key], torch.float32, f"{op} d{key}")


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, module == functional, dispatch
# ---------------------------------------------------------------------------------------------------------------


def _op_cases():
    inputs = make_inputs("gated", 2, 3, 16, torch.float32)
    x, y, gate, shift, scale = (inputs[k] for k in ("x", "y", "gate", "shift", "scale"))
    with force_backend("torch"):
        _, mean, rstd = torch.ops.coredi.layernorm_modulate_fwd(x, shift, scale, EPS)
        h, _, hmean, hrstd = torch.ops.coredi.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, EPS)
    dout, dh_in = torch.randn_like(x), torch.randn_like(x)
    leaf = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    return [
        (torch.ops.coredi.layernorm_modulate_fwd.default, (leaf["x"], leaf["shift"], leaf["scale"], EPS)),
        (
            torch.ops.coredi.gated_residual_layernorm_modulate_fwd.default,
            (leaf["x"], leaf["y"], leaf["gate"], leaf["shift"], leaf["scale"], EPS),
        ),
        (torch.ops.coredi.layernorm_modulate_bwd.default, (dout, x, scale, mean, rstd)),
        (
            torch.ops.coredi.gated_residual_layernorm_modulate_bwd.default,
            (dout, dh_in, h, y, gate, scale, hmean, hrstd),
        ),
        (torch.ops.coredi.gated_residual_layernorm_modulate_bwd.default, (dout, None, h, y, gate, scale, hmean, hrstd)),
    ]


def test_opcheck(backend):
    for op, args in _op_cases():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_matches_eager():
    """One compiled function that uses both ops (CPU, torch backend): same values and gradients as eager."""

    def block(x, y, gate, shift, scale):
        h, out = gated_residual_layernorm_modulate(x, y, gate, shift, scale, EPS)
        return h, layernorm_modulate(out * 2 + h, shift, scale, EPS)

    inputs = make_inputs("gated", 2, 3, 16, torch.float32)
    args = [inputs[k] for k in ("x", "y", "gate", "shift", "scale")]
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


def test_modules_equal_functional_forms():
    inputs = make_inputs("gated", 2, 5, 40, torch.float32)
    x, y, gate, shift, scale = (inputs[k] for k in ("x", "y", "gate", "shift", "scale"))
    for name in BACKENDS:
        with force_backend(name):
            module_out = LayerNormModulate(40, eps=1e-5)(x, shift, scale)
            torch.testing.assert_close(module_out, layernorm_modulate(x, shift, scale, 1e-5), rtol=0, atol=0)
            got = GatedResidualLayerNormModulate(40)(x, y, gate, shift, scale)
            want = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    # ... and the functional forms equal the reference (so the module is not merely self-consistent).
    expected = run_reference("plain", float64(inputs))[0]
    assert_close(LayerNormModulate(40)(x, shift, scale), expected, torch.float32, "out")


def test_auto_backend_is_torch_on_cpu_and_triton_runs_the_kernels(monkeypatch):
    calls = []
    launcher = _kernels.layernorm_modulate_fwd
    monkeypatch.setattr(_kernels, "layernorm_modulate_fwd", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    inputs = make_inputs("plain", 2, 3, 16, torch.float32)
    args = (inputs["x"], inputs["shift"], inputs["scale"])
    with force_backend("auto"):
        auto_out = layernorm_modulate(*args)
    assert calls == []
    with force_backend("triton"):
        triton_out = layernorm_modulate(*args)
    assert calls == [1]
    torch.testing.assert_close(triton_out, auto_out, rtol=1e-5, atol=1e-5)


def test_backend_selection_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    assert backend_mod.requested_backend() == "auto"
    assert backend_mod.select_backend("op", cpu) == "torch"
    assert backend_mod.select_backend("op", torch.device("cuda")) in ("triton", "torch")
    monkeypatch.setenv(backend_mod.ENV_VAR, "triton")
    assert backend_mod.select_backend("op", cpu) == "triton"  # the interpreter is on in these tests
    with force_backend("torch"):
        assert backend_mod.select_backend("op", cpu) == "torch"
        with force_backend("auto"):
            assert backend_mod.requested_backend() == "auto"
        assert backend_mod.requested_backend() == "torch"
    with force_backend("triton"), pytest.raises(RuntimeError, match="myop.*bad dtype"):
        backend_mod.select_backend("myop", cpu, ["bad dtype"])
    monkeypatch.setattr(backend_mod, "is_interpreter", lambda: False)
    with force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_mod.select_backend("myop", cpu)
    monkeypatch.setenv(backend_mod.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="COREDI_KERNELS_BACKEND"):
        backend_mod.requested_backend()
    with pytest.raises(ValueError, match="force_backend"):
        with force_backend("fast"):
            pass


def test_bad_inputs_raise_errors_naming_the_argument():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    p = torch.randn(2, 8)
    cases = [
        (lambda: layernorm_modulate(torch.randn(6, 8), p, p), ValueError, "x must have shape"),
        (lambda: layernorm_modulate(x, torch.randn(2, 1, 8), p), ValueError, "shift must have shape"),
        (lambda: layernorm_modulate(x, p, torch.randn(3, 8)), ValueError, "scale must have shape"),
        (lambda: layernorm_modulate(x.long(), p, p), TypeError, "x must be a floating-point"),
        (lambda: layernorm_modulate(x, p, p, eps=0.0), ValueError, "eps must be > 0"),
        (lambda: gated_residual_layernorm_modulate(x, y[:, :2], p, p, p), ValueError, "y must have x's shape"),
        (lambda: gated_residual_layernorm_modulate(x, y.long(), p, p, p), TypeError, "y must be a floating-point"),
        (lambda: gated_residual_layernorm_modulate(x, y, p[:, :4], p, p), ValueError, "gate must have shape"),
        (lambda: LayerNormModulate(0), ValueError, "hidden_size"),
        (lambda: GatedResidualLayerNormModulate(8, eps=-1), ValueError, "eps"),
        (lambda: LayerNormModulate(16)(x, p, p), ValueError, "hidden_size=16"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            fn()


def test_public_api_is_exported():
    assert set(coredi_kernels.__all__) >= {
        "layernorm_modulate",
        "gated_residual_layernorm_modulate",
        "LayerNormModulate",
        "GatedResidualLayerNormModulate",
        "force_backend",
    }


# ---------------------------------------------------------------------------------------------------------------
# bf16: flash-attention's two-reference error budget (tiny on the CPU interpreter, real shapes on a GPU)
# ---------------------------------------------------------------------------------------------------------------


def _dit_formula(op, inputs):
    """What an unfused DiT block computes (nn.LayerNorm without affine, then modulate), in the inputs' dtype."""
    D = inputs["x"].shape[-1]

    def norm_mod(h):
        return F.layer_norm(h, (D,), eps=EPS) * (1 + inputs["scale"].unsqueeze(1)) + inputs["shift"].unsqueeze(1)

    if op == "plain":
        return (norm_mod(inputs["x"]),)
    h = inputs["x"] + inputs["gate"].unsqueeze(1) * inputs["y"]
    return h, norm_mod(h)


def check_bf16_error_budget(op, shape, device):
    """Our bf16 error against an fp32 reference must be <= 2x PyTorch's own bf16 error, plus a small atol."""
    inputs = make_inputs(op, *shape, torch.bfloat16, device=device)
    cots = [torch.randn(shape, device=device).bfloat16() for _ in range(1 if op == "plain" else 2)]
    fp32 = {k: v.float() for k, v in inputs.items()}
    ref_out = _dit_formula(op, fp32)
    ref_grads = grads(_dit_formula, op, fp32, [c.float() for c in cots])
    torch_out = _dit_formula(op, inputs)
    torch_grads = grads(_dit_formula, op, inputs, cots)
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
        check_bf16_error_budget(op, (2, 3, 1152), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 1152), (3, 77, 1152), (5, 33, 640)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS)
def test_gpu_bf16_error_budget(op, shape):
    check_bf16_error_budget(op, shape, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_fp32_matches_reference_with_default_tiles(op):
    B, T, D = 6, 77, 1152  # 77 rows per sample: default tiles cross sample boundaries
    block_m = row_tile_config(D, _kernels.FWD_TILE_ELEMENTS).BLOCK_M
    assert block_m == 1 or tile_spans_two_samples(B * T, T, block_m)
    inputs = make_inputs(op, B, T, D, torch.float32, device="cuda", param_spread=10.0)
    cots = [torch.randn(B, T, D, device="cuda") for _ in range(1 if op == "plain" else 2)]
    for got, want in zip(run_op(op, inputs), run_reference(op, float64(inputs)), strict=True):
        assert_close(got, want, torch.float32, "forward")
    got = grads(lambda o, i: run_op(o, i), op, inputs, cots)
    want = grads(run_reference, op, float64(inputs), [c.double() for c in cots])
    for key in inputs:
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-4, atol=1e-4, msg=f"d{key} differs")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_backward_is_deterministic(op):
    inputs = make_inputs(op, 64, 256, 1152, torch.bfloat16, device="cuda")
    cots = [torch.randn(64, 256, 1152, device="cuda").bfloat16() for _ in range(1 if op == "plain" else 2)]
    first = grads(lambda o, i: run_op(o, i), op, inputs, cots)
    second = grads(lambda o, i: run_op(o, i), op, inputs, cots)
    for key in inputs:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    inputs = make_inputs("gated", 2, 9, 1152, torch.bfloat16, device="cuda")
    args = [inputs[k].requires_grad_(True) for k in ("x", "y", "gate", "shift", "scale")]
    torch.library.opcheck(torch.ops.coredi.gated_residual_layernorm_modulate_fwd.default, (*args, EPS))
    torch.library.opcheck(torch.ops.coredi.layernorm_modulate_fwd.default, (args[0], args[3], args[4], EPS))

    def block(x, y, gate, shift, scale):
        h, out = gated_residual_layernorm_modulate(x, y, gate, shift, scale, EPS)
        return layernorm_modulate(out + h, shift, scale, EPS)

    eager = block(*args)
    compiled = torch.compile(block, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
