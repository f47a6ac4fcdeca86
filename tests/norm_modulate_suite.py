"""The tests LayerNorm + modulate and RMSNorm + modulate share (coredi_kernels.norm_modulate implements both).

`NormModulateTests` holds them; tests/test_kernel_layernorm_modulate.py and tests/test_kernel_rmsnorm_modulate.py
each subclass it with their norm's `NormCase` and add the tests only that norm has. Every op is checked against
float64 math (`reference.*_ref`, itself checked in each norm's file) with both backends forced ("triton" and
"torch"); RMSNorm also with and without its weight. On a CPU machine the Triton kernels run under
TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny; GPU tests (bf16, real shapes) carry `gpu`.

Inputs are dicts: x, shift, scale [, weight] [, y, gate]. An op's tensor arguments come in one order for every
function of both norms (ops, launchers, torch backend): (x, [y, gate,] [weight,] shift, scale); `op_args` builds it.
"""
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor

import coredi_kernels
from coredi_kernels import force_backend
from coredi_kernels._utils import row_tile_config

EPS = 1e-6
TOLERANCES = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
BACKENDS = ["triton", "torch"]
OPS = ["plain", "gated"]


@dataclass(frozen=True)
class NormCase:
    """What differs between the two norms; the shared tests take everything else from the ops' common layout."""

    name: str  # "layernorm" | "rmsnorm": the ops are `{name}_modulate` and `gated_residual_{name}_modulate`
    plain_module: type
    gated_module: type
    width: int  # the model width in the shapes (SiT-XL's 1152, JiT-H's 1280)
    tokens: int  # rows per sample of the real GPU shapes
    narrow_width: int  # a second, narrower GPU width
    gpu_grad_atol: float  # fp32 gradients against float64 on the GPU
    unfused_norm: Callable  # (h, inputs) -> what an unfused model's norm computes, in h's dtype

    @property
    def package(self) -> ModuleType:
        """The public face, coredi_kernels.layernorm_modulate / .rmsnorm_modulate (a module attribute of
        coredi_kernels with that name is the function, hence the import by name)."""
        return importlib.import_module(f"coredi_kernels.{self.name}_modulate")

    @property
    def gpu_shapes(self) -> tuple:
        return ((8, self.tokens, self.width), (3, 77, self.width), (5, 33, self.narrow_width))

    @property
    def is_rms_norm(self) -> bool:
        return self.name == "rmsnorm"

    @property
    def takes_weight(self) -> bool:
        """RMSNorm's ops take an optional (D,) weight; LayerNorm's have no affine parameters."""
        return self.is_rms_norm

    @property
    def weights(self) -> tuple:
        return ("weight", "no-weight") if self.takes_weight else ("no-weight",)

    @property
    def shapes(self) -> list:
        """(B, T, D): D not a power of two (the model width), tiny B·T, odd T, T = 1."""
        return [(2, 3, self.width), (3, 5, 48), (1, 7, 100), (4, 1, 33)]

    @property
    def kernels(self) -> ModuleType:
        return self.package._kernels

    @property
    def reference(self) -> ModuleType:
        return self.package.reference

    def op_name(self, op: str) -> str:
        return f"{self.name}_modulate" if op == "plain" else f"gated_residual_{self.name}_modulate"

    def function(self, op: str) -> Callable:
        """The public functional op."""
        return getattr(self.package, self.op_name(op))

    def custom_op(self, op: str, direction: str):
        return getattr(torch.ops.coredi, f"{self.op_name(op)}_{direction}").default

    def launcher(self, op: str, direction: str) -> Callable:
        return getattr(self.kernels, f"{self.op_name(op)}_{direction}")


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(norm, op, B, T, D, dtype, device="cpu", param_spread=1.0, with_weight=True):
    """Random inputs; each sample's modulation rows differ (offset by the sample index) so mixing them up shows.
    The weight is drawn only for RMSNorm (and with_weight)."""
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + T * 10 + D)
    sample_offset = param_spread * torch.arange(B, dtype=torch.float32)[:, None]

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    inputs = {
        "x": rnd(B, T, D) * 2 + 0.5,
        "shift": rnd(B, D, std=0.5) + sample_offset,
        "scale": rnd(B, D, std=0.5) - 0.3 * sample_offset,
    }
    if norm.takes_weight and with_weight:
        inputs["weight"] = 1 + rnd(D, std=0.5)
    if op == "gated":
        inputs["y"] = rnd(B, T, D)
        inputs["gate"] = rnd(B, D, std=0.5) + 0.5 * sample_offset
    return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


def arg_names(norm, op) -> list[str]:
    """The op's tensor arguments in order, the same for the custom ops, launchers and torch backend of both norms."""
    return ["x"] + ["y", "gate"] * (op == "gated") + ["weight"] * norm.takes_weight + ["shift", "scale"]


def op_args(norm, op, inputs) -> list:
    """`inputs` as the op's tensor arguments (`arg_names`); an absent weight is None."""
    return [inputs.get(k) if k == "weight" else inputs[k] for k in arg_names(norm, op)]


def backward_args(upstream, rows, forward_args, stats) -> tuple:
    """A backward's arguments (custom op and launcher alike): (dout, [dh_in,] rows, [y, gate,] [weight,] scale,
    *stats), i.e. the forward's tensor arguments with x replaced by the normalized rows (h for the gated op) and
    shift dropped."""
    *middle, _shift, scale = forward_args[1:]
    return (*upstream, rows, *middle, scale, *stats)


def split_stats(norm, outputs) -> tuple:
    """A forward's outputs -> (*tensor outputs, stats), stats = LayerNorm's (mean, rstd) or RMSNorm's (rstd,)."""
    num_stats = 1 if norm.is_rms_norm else 2
    return (*outputs[:-num_stats], tuple(outputs[-num_stats:]))


def run_op(norm, op, inputs, eps=EPS):
    """The public op under test -> tuple of outputs: (out,) or (h, out)."""
    outputs = norm.function(op)(*_activations(op, inputs), **_params(inputs), eps=eps)
    return outputs if op == "gated" else (outputs,)


def run_reference(norm, op, inputs, eps=EPS):
    """The reference formula on `inputs` (float64 inputs give the float64 oracle) -> tuple of outputs."""
    reference = getattr(norm.reference, norm.op_name(op) + "_ref")
    outputs = reference(*_activations(op, inputs), **_params(inputs), eps=eps)
    return outputs if op == "gated" else (outputs,)


def _activations(op, inputs) -> list:
    return [inputs[k] for k in (("x", "y", "gate") if op == "gated" else ("x",))]


def _params(inputs) -> dict:
    """shift, scale [, weight] as keyword arguments (their positions differ between the two norms' functions)."""
    return {k: inputs[k] for k in ("shift", "scale", "weight") if k in inputs}


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


def expected_statistics(norm, rows: Tensor) -> tuple[Optional[Tensor], Tensor]:
    """float64 (mean, rstd) of the normalized rows: LayerNorm's mean and 1/sqrt(var + eps); RMSNorm has no mean and
    1/sqrt(mean(x²) + eps)."""
    rows = rows.double()
    if norm.is_rms_norm:
        return None, (rows.square().mean(dim=-1) + EPS).rsqrt()
    var, mean = torch.var_mean(rows, dim=-1, correction=0)
    return mean, (var + EPS).rsqrt()


def unfused_formula(norm, op, inputs):
    """What an unfused block computes (the model's norm, then modulate), in the inputs' dtype."""

    def norm_mod(h):
        return norm.unfused_norm(h, inputs) * (1 + inputs["scale"].unsqueeze(1)) + inputs["shift"].unsqueeze(1)

    if op == "plain":
        return (norm_mod(inputs["x"]),)
    h = inputs["x"] + inputs["gate"].unsqueeze(1) * inputs["y"]
    return h, norm_mod(h)


def check_bf16_error_budget(norm, op, shape, device):
    """Our bf16 error against an fp32 reference must be <= 2x PyTorch's own bf16 error, plus a small atol."""
    inputs = make_inputs(norm, op, *shape, torch.bfloat16, device=device)
    cots = [torch.randn(shape, device=device).bfloat16() for _ in range(1 if op == "plain" else 2)]
    fp32 = {k: v.float() for k, v in inputs.items()}

    def formula(o, i):
        return unfused_formula(norm, o, i)

    ref_out = formula(op, fp32)
    ref_grads = grads(formula, op, fp32, [c.float() for c in cots])
    torch_out = formula(op, inputs)
    torch_grads = grads(formula, op, inputs, cots)
    ours_out = run_op(norm, op, inputs)
    ours_grads = grads(lambda o, i: run_op(norm, o, i), op, inputs, cots)

    def check(name, ours, theirs, ref):
        ours_err = (ours.float() - ref).abs().max().item()
        torch_err = (theirs.float() - ref).abs().max().item()
        atol = 1e-2 * max(1.0, ref.abs().max().item())
        assert ours_err <= 2 * torch_err + atol, f"{name}: ours {ours_err:.3g} vs torch {torch_err:.3g} (+{atol:.3g})"

    for name, ours, theirs, ref in zip(("h", "out")[-len(ours_out):], ours_out, torch_out, ref_out, strict=True):
        check(name, ours, theirs, ref)
    for name in inputs:
        check(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name])


# ---------------------------------------------------------------------------------------------------------------
# The shared tests
# ---------------------------------------------------------------------------------------------------------------


class NormModulateTests:
    """Run for one norm by a subclass that sets `norm`. Parameters that depend on the norm (shapes, with and without
    weight) are filled in by `pytest_generate_tests`."""

    norm: NormCase

    def pytest_generate_tests(self, metafunc):
        for name, values, ids in (
            ("shape", self.norm.shapes, shape_id),
            ("gpu_shape", self.norm.gpu_shapes, shape_id),
            ("weight", self.norm.weights, None),
        ):
            if name in metafunc.fixturenames:
                metafunc.parametrize(name, values, ids=ids)

    @pytest.fixture(params=BACKENDS)
    def backend(self, request):
        with force_backend(request.param):
            yield request.param

    def run(self, op, inputs, eps=EPS):
        return run_op(self.norm, op, inputs, eps)

    def reference(self, op, inputs, eps=EPS):
        return run_reference(self.norm, op, inputs, eps)

    def inputs(self, op, *shape, dtype=torch.float32, **kwargs):
        return make_inputs(self.norm, op, *shape, dtype, **kwargs)

    # --- the torch backend's hand-written backward -----------------------------------------------------------

    def test_torch_backend_backward_formulas_pass_gradcheck(self):
        """The hand-written backward of the torch backend against finite differences (float64), weight included."""
        inputs = {k: v.requires_grad_(True) for k, v in float64(self.inputs("gated", 2, 3, 7)).items()}
        with force_backend("torch"):
            for op in OPS:
                names = [k for k in inputs if op == "gated" or k not in ("y", "gate")]
                assert torch.autograd.gradcheck(
                    lambda *tensors, op=op, names=names: self.run(op, dict(zip(names, tensors))),
                    tuple(inputs[k] for k in names),
                )

    # --- values and gradients, both backends -----------------------------------------------------------------

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("op", OPS)
    def test_forward_matches_reference(self, backend, op, dtype, shape, weight):
        inputs = self.inputs(op, *shape, dtype=dtype, with_weight=weight == "weight")
        outputs = self.run(op, inputs)
        expected = self.reference(op, float64(inputs))
        for name, got, want in zip(("h", "out")[-len(outputs):], outputs, expected, strict=True):
            assert got.dtype == dtype and got.shape == shape
            assert_close(got, want, dtype, name)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    @pytest.mark.parametrize("op", OPS)
    def test_gradients_match_reference(self, backend, op, dtype, shape, weight):
        inputs = self.inputs(op, *shape, dtype=dtype, with_weight=weight == "weight")
        cotangents = [torch.randn(shape).to(dtype) for _ in range(1 if op == "plain" else 2)]
        got = grads(self.run, op, inputs, cotangents)
        want = grads(self.reference, op, float64(inputs), [c.double() for c in cotangents])
        assert set(got) == set(inputs)  # x, shift, scale (+ weight) (+ y, gate)
        for name in inputs:
            assert got[name].dtype == dtype and got[name].shape == inputs[name].shape, name
            assert_close(got[name], want[name], dtype, f"d{name}")

    def test_mixed_dtypes_as_under_autocast(self, backend):
        """A model under autocast: fp32 residual stream (and RMSNorm weight), fp16 branch output and modulation
        rows. h and out stay fp32; each gradient comes back in its input's dtype."""
        inputs = self.inputs("gated", 2, 5, 48)
        for key in ("y", "gate", "shift", "scale"):
            inputs[key] = inputs[key].half()
        cots = [torch.randn(2, 5, 48), torch.randn(2, 5, 48)]
        outputs = self.run("gated", inputs)
        assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
        for got, want in zip(outputs, self.reference("gated", float64(inputs)), strict=True):
            assert_close(got, want, torch.float32, "forward")
        got = grads(self.run, "gated", inputs, cots)
        want = grads(self.reference, "gated", float64(inputs), [c.double() for c in cots])
        for key, value in inputs.items():
            assert got[key].dtype == value.dtype, key
            assert_close(got[key], want[key], value.dtype, f"d{key}")

    def test_float64_runs_on_the_torch_backend_and_triton_refuses_it(self):
        inputs = float64(self.inputs("plain", 2, 3, 16))
        with force_backend("auto"):
            out = self.run("plain", inputs)[0]
        torch.testing.assert_close(out, self.reference("plain", inputs)[0], rtol=1e-12, atol=1e-12)
        with force_backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
            self.run("plain", inputs)

    # --- tiles that cross sample boundaries; backward programs that split a sample -----------------------------

    @pytest.mark.parametrize("op", OPS)
    @pytest.mark.parametrize(
        "T, block_m", [(5, 4), (3, 8), (8, 4)], ids=["crossing", "tile-holds-3-samples", "aligned"]
    )
    def test_forward_launcher_with_tiles_across_samples(self, op, T, block_m):
        """Per-row modulation rows (row // T), whichever way the BLOCK_M-row tiles fall on the sample boundaries."""
        B, D = 3, 48
        assert tile_spans_two_samples(B * T, T, block_m) == (T % block_m != 0)
        inputs = self.inputs(op, B, T, D, param_spread=10.0)
        expected = self.reference(op, float64(inputs))
        launched = self.norm.launcher(op, "fwd")(*op_args(self.norm, op, inputs), EPS, block_m=block_m)
        *outputs, stats = split_stats(self.norm, launched)
        for got, want in zip(outputs, expected, strict=True):
            assert_close(got, want, torch.float32, "forward")
        normalized = inputs["x"] if op == "plain" else expected[0]
        mean, rstd = expected_statistics(self.norm, normalized)
        if mean is not None:
            torch.testing.assert_close(stats[0].double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[-1].double(), rstd, rtol=1e-5, atol=1e-6)

    def test_default_tiles_cross_samples_through_the_public_op(self):
        """With the heuristic BLOCK_M (not passed by the test), a tile spans several samples: values still right."""
        B, T, D = 16, 5, 48
        block_m = row_tile_config(D, self.norm.kernels.FWD_TILE_ELEMENTS).BLOCK_M
        assert T % block_m != 0 and tile_spans_two_samples(B * T, T, block_m)
        inputs = self.inputs("gated", B, T, D, param_spread=10.0)
        with force_backend("triton"):
            outputs = self.run("gated", inputs)
        for got, want in zip(outputs, self.reference("gated", float64(inputs)), strict=True):
            assert_close(got, want, torch.float32, "forward")

    @pytest.mark.parametrize("op", OPS)
    @pytest.mark.parametrize("block_m, rows_per_program", [(2, 4), (1, 1), (4, 8)])
    def test_backward_launcher_splits_samples_into_chunks(self, op, block_m, rows_per_program, weight):
        """Backward programs own `rows_per_program` rows of one sample (the last chunk partly masked); the per-sample
        parameter gradients are the sum of their partials, and dweight the sum over samples too."""
        B, T, D = 3, 7, 48
        norm = self.norm
        inputs = self.inputs(op, B, T, D, param_spread=10.0, with_weight=weight == "weight")
        dout, dh_in = torch.randn(B, T, D), torch.randn(B, T, D)
        want = grads(self.reference, op, float64(inputs), [dh_in.double(), dout.double()][-1 if op == "plain" else 0:])
        args = op_args(norm, op, inputs)
        forward = getattr(norm.reference, norm.op_name(op) + "_fwd_torch")(*args, EPS)
        *_, stats = split_stats(norm, forward)
        rows, upstream = (args[0], [dout]) if op == "plain" else (forward[0], [dout, dh_in])
        launch = dict(block_m=block_m, rows_per_program=rows_per_program)
        result = norm.launcher(op, "bwd")(*backward_args(upstream, rows, args, stats), **launch)
        # One gradient per tensor argument of the forward, in its order.
        got = dict(zip(arg_names(norm, op), result, strict=True))
        if norm.takes_weight and "weight" not in inputs:
            assert got.pop("weight") is None
        assert set(got) == set(inputs)
        for name, value in got.items():
            assert_close(value, want[name], torch.float32, f"d{name}")

    def test_gated_backward_without_upstream_gradient_of_h(self):
        """Only `out` is used: dh comes from the norm alone (the kernel's HAS_DH_IN=False path)."""
        inputs = self.inputs("gated", 2, 5, 48)
        dout = torch.randn(2, 5, 48)
        want = grads(lambda o, i: self.reference(o, i)[1:], "gated", float64(inputs), [dout.double()])
        for name in BACKENDS:
            with force_backend(name):
                got = grads(lambda o, i: self.run(o, i)[1:], "gated", inputs, [dout])
            for key in inputs:
                assert_close(got[key], want[key], torch.float32, f"{name}: d{key}")

    # --- layouts -------------------------------------------------------------------------------------------------

    def test_non_contiguous_inputs_and_strided_parameters(self, backend):
        """x as a transposed view, modulation rows as `chunk` views of one adaLN output (row stride 6·D), a strided
        RMSNorm weight, and a non-contiguous upstream gradient."""
        B, T, D = 2, 5, 24
        inputs = self.inputs("gated", B, T, D)
        x = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
        y = inputs["y"].transpose(1, 2).contiguous().transpose(1, 2)
        ada = torch.randn(B, 6 * D)
        shift, scale, gate = ada.chunk(6, dim=1)[:3]
        assert not x.is_contiguous() and shift.stride(0) == 6 * D
        strided = dict(x=x, y=y, gate=gate, shift=shift, scale=scale)
        if self.norm.takes_weight:
            strided["weight"] = torch.randn(2 * D)[::2]
            assert strided["weight"].stride(0) == 2
        dout = torch.randn(B, D, T).transpose(1, 2)
        dh_in = torch.randn(B, D, T).transpose(1, 2)
        for op in OPS:
            cots = [dout] if op == "plain" else [dh_in, dout]
            args = {k: v for k, v in strided.items() if op == "gated" or k not in ("y", "gate")}
            for got, want in zip(self.run(op, args), self.reference(op, float64(args)), strict=True):
                assert_close(got, want, torch.float32, f"{op} forward")
            got = grads(self.run, op, args, cots)
            want = grads(self.reference, op, float64(args), [c.double() for c in cots])
            for key in args:
                assert_close(got[key], want[key], torch.float32, f"{op} d{key}")

    # --- registration: opcheck, torch.compile, module == functional, dispatch ----------------------------------

    def test_opcheck(self, backend):
        for op, args in _op_cases(self.norm):
            torch.library.opcheck(op, args)

    def test_torch_compile_fullgraph_matches_eager(self):
        """One compiled function that uses both ops (CPU, torch backend): same values and gradients as eager."""
        inputs = self.inputs("gated", 2, 3, 16)
        names = list(inputs)
        gated_fn, plain_fn = self.norm.function("gated"), self.norm.function("plain")

        def block(*tensors):
            t = dict(zip(names, tensors))
            h, out = gated_fn(t["x"], t["y"], t["gate"], **_params(t), eps=EPS)
            return h, plain_fn(out * 2 + h, t["shift"], t["scale"], eps=EPS)  # RMSNorm: without weight

        cots = [torch.randn(2, 3, 16), torch.randn(2, 3, 16)]
        compiled = torch.compile(block, fullgraph=True, dynamic=False)

        def run(fn):
            leaves = [inputs[k].clone().requires_grad_(True) for k in names]
            outputs = fn(*leaves)
            return outputs, torch.autograd.grad(outputs, leaves, cots)

        with force_backend("torch"):
            (eager_out, eager_grads), (comp_out, comp_grads) = run(block), run(compiled)
        for got, want in zip(comp_out + comp_grads, eager_out + eager_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_close(eager_out[0], self.reference("gated", float64(inputs))[0], torch.float32, "h")

    def test_modules_equal_functional_forms(self):
        inputs = self.inputs("gated", 2, 5, 40)
        x, y, gate, shift, scale = (inputs[k] for k in ("x", "y", "gate", "shift", "scale"))
        weight = {"weight": inputs["weight"]} if "weight" in inputs else {}
        plain, gated = self.norm.plain_module(40, eps=1e-5), self.norm.gated_module(40)
        for module in (plain, gated):  # LayerNorm's modules have no parameters, RMSNorm's own the weight
            assert [n for n, _ in module.named_parameters()] == (["weight"] if self.norm.takes_weight else [])
        if weight:
            with torch.no_grad():
                plain.weight.copy_(weight["weight"])
                gated.weight.copy_(weight["weight"])
        for name in BACKENDS:
            with force_backend(name):
                want = self.norm.function("plain")(x, shift, scale, **weight, eps=1e-5)
                torch.testing.assert_close(plain(x, shift, scale), want, rtol=0, atol=0)
                want = self.norm.function("gated")(x, y, gate, shift, scale, **weight)
                for got, expected in zip(gated(x, y, gate, shift, scale), want, strict=True):
                    torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # ... and the modules equal the reference (so they are not merely self-consistent): the one built with
        # eps=1e-5 (RMSNorm: weight set above), and a default one (eps=1e-6; RMSNorm: weight ones).
        plain_inputs = float64({k: v for k, v in inputs.items() if k not in ("y", "gate")})
        assert_close(plain(x, shift, scale), self.reference("plain", plain_inputs, eps=1e-5)[0], torch.float32, "out")
        default = self.norm.plain_module(40)
        if self.norm.takes_weight:
            plain_inputs["weight"] = default.weight.detach().double()  # ones
        assert_close(default(x, shift, scale), self.reference("plain", plain_inputs)[0], torch.float32, "out")

    def test_auto_backend_is_torch_on_cpu_and_triton_runs_the_kernels(self, monkeypatch):
        calls = []
        name = self.norm.op_name("plain") + "_fwd"
        launcher = getattr(self.norm.kernels, name)
        monkeypatch.setattr(self.norm.kernels, name, lambda *a, **k: calls.append(1) or launcher(*a, **k))
        inputs = self.inputs("plain", 2, 3, 16)
        with force_backend("auto"):
            auto_out = self.run("plain", inputs)[0]
        assert calls == []
        with force_backend("triton"):
            triton_out = self.run("plain", inputs)[0]
        assert calls == [1]
        torch.testing.assert_close(triton_out, auto_out, rtol=1e-5, atol=1e-5)

    def test_bad_inputs_raise_errors_naming_the_argument(self):
        x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        p = torch.randn(2, 8)
        weight = {"weight": torch.randn(8)} if self.norm.takes_weight else {}
        plain, gated = self.norm.function("plain"), self.norm.function("gated")
        Plain, Gated = self.norm.plain_module, self.norm.gated_module
        cases = [
            (lambda: plain(torch.randn(6, 8), p, p), ValueError, "x must have shape"),
            (lambda: plain(x, torch.randn(2, 1, 8), p), ValueError, "shift must have shape"),
            (lambda: plain(x, p, torch.randn(3, 8)), ValueError, "scale must have shape"),
            (lambda: plain(x.long(), p, p), TypeError, "x must be a floating-point"),
            (lambda: plain(x, p, p, eps=0.0), ValueError, "eps must be > 0"),
            (lambda: gated(x, y[:, :2], p, p, p), ValueError, "y must have x's shape"),
            (lambda: gated(x, y.long(), p, p, p), TypeError, "y must be a floating-point"),
            (lambda: gated(x, y, p[:, :4], p, p, **weight), ValueError, "gate must have shape"),
            (lambda: Plain(0), ValueError, "hidden_size"),
            (lambda: Gated(8, eps=-1), ValueError, "eps"),
            (lambda: Plain(16)(x, p, p), ValueError, "hidden_size=16"),
        ]
        for fn, error, message in cases:
            with pytest.raises(error, match=message):
                fn()

    def test_public_api_is_exported(self):
        names = {self.norm.op_name("plain"), self.norm.op_name("gated"), self.norm.plain_module.__name__,
                 self.norm.gated_module.__name__}
        assert set(self.norm.package.__all__) == names
        assert set(coredi_kernels.__all__) >= names | {"force_backend"}
        assert coredi_kernels.force_backend is force_backend

    # --- bf16: flash-attention's two-reference error budget (tiny on the CPU interpreter, real shapes on a GPU) --

    @pytest.mark.parametrize("op", OPS)
    def test_bf16_error_budget_interpreter(self, op):
        with force_backend("triton"):
            check_bf16_error_budget(self.norm, op, (2, 3, self.norm.width), "cpu")

    # --- GPU -----------------------------------------------------------------------------------------------------

    @pytest.mark.gpu
    @pytest.mark.parametrize("op", OPS)
    def test_gpu_bf16_error_budget(self, op, gpu_shape):
        check_bf16_error_budget(self.norm, op, gpu_shape, "cuda")

    @pytest.mark.gpu
    @pytest.mark.parametrize("op", OPS)
    def test_gpu_fp32_matches_reference_with_default_tiles(self, op, weight):
        B, T, D = 6, 77, self.norm.width  # 77 rows per sample: default tiles cross sample boundaries
        block_m = row_tile_config(D, self.norm.kernels.FWD_TILE_ELEMENTS).BLOCK_M
        assert block_m == 1 or tile_spans_two_samples(B * T, T, block_m)
        inputs = self.inputs(op, B, T, D, device="cuda", param_spread=10.0, with_weight=weight == "weight")
        cots = [torch.randn(B, T, D, device="cuda") for _ in range(1 if op == "plain" else 2)]
        for got, want in zip(self.run(op, inputs), self.reference(op, float64(inputs)), strict=True):
            assert_close(got, want, torch.float32, "forward")
        got = grads(self.run, op, inputs, cots)
        want = grads(self.reference, op, float64(inputs), [c.double() for c in cots])
        for key in inputs:
            torch.testing.assert_close(got[key].double(), want[key], rtol=1e-4, atol=self.norm.gpu_grad_atol,
                                       msg=f"d{key} differs")

    @pytest.mark.gpu
    @pytest.mark.parametrize("op", OPS)
    def test_gpu_backward_is_deterministic(self, op):
        shape = (64, self.norm.tokens, self.norm.width)
        inputs = self.inputs(op, *shape, dtype=torch.bfloat16, device="cuda")
        cots = [torch.randn(shape, device="cuda").bfloat16() for _ in range(1 if op == "plain" else 2)]
        first = grads(self.run, op, inputs, cots)
        second = grads(self.run, op, inputs, cots)
        for key in inputs:
            assert torch.equal(first[key], second[key]), key

    @pytest.mark.gpu
    def test_gpu_opcheck_and_compile(self):
        inputs = self.inputs("gated", 2, 9, self.norm.width, dtype=torch.bfloat16, device="cuda")
        args = [t.requires_grad_(True) for t in op_args(self.norm, "gated", inputs)]
        names = arg_names(self.norm, "gated")
        torch.library.opcheck(self.norm.custom_op("gated", "fwd"), (*args, EPS))
        plain_args = (args[0], *args[3:])  # x, [weight,] shift, scale
        torch.library.opcheck(self.norm.custom_op("plain", "fwd"), (*plain_args, EPS))
        gated_fn, plain_fn = self.norm.function("gated"), self.norm.function("plain")

        def block(*tensors):
            t = dict(zip(names, tensors))
            h, out = gated_fn(t["x"], t["y"], t["gate"], **_params(t), eps=EPS)
            return plain_fn(out + h, **_params(t), eps=EPS)

        eager = block(*args)
        compiled = torch.compile(block, fullgraph=True)(*args)
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def _op_cases(norm):
    """(custom op, args) for opcheck: both forwards (inputs that require grad) and both backwards, the gated one
    with and without dh_in; RMSNorm's with and without its weight."""
    inputs = make_inputs(norm, "gated", 2, 3, 16, torch.float32)
    dout, dh_in = torch.randn_like(inputs["x"]), torch.randn_like(inputs["x"])
    with force_backend("torch"):
        *_, stats = split_stats(norm, norm.custom_op("plain", "fwd")(*op_args(norm, "plain", inputs), EPS))
        h, _, hstats = split_stats(norm, norm.custom_op("gated", "fwd")(*op_args(norm, "gated", inputs), EPS))
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    variants = [(inputs, leaves)]
    if norm.takes_weight:
        variants.append(tuple({k: v for k, v in d.items() if k != "weight"} for d in (inputs, leaves)))
    cases = []
    for tensors, leaf in variants:
        plain, gated = op_args(norm, "plain", tensors), op_args(norm, "gated", tensors)
        cases += [
            (norm.custom_op("plain", "fwd"), (*op_args(norm, "plain", leaf), EPS)),
            (norm.custom_op("gated", "fwd"), (*op_args(norm, "gated", leaf), EPS)),
            (norm.custom_op("plain", "bwd"), backward_args([dout], plain[0], plain, stats)),
            (norm.custom_op("gated", "bwd"), backward_args([dout, dh_in], h, gated, hstats)),
            (norm.custom_op("gated", "bwd"), backward_args([dout, None], h, gated, hstats)),
        ]
    return cases
