"""coredi_kernels.attention: every backend that runs here against a float64 softmax(QKᵀ/√d)V written below, the
selection logic on simulated GPUs, overrides, the explanation table, torch.compile, and readable refusals.

On a CPU machine sdpa_flash and sdpa_math run; the CUDA backends are checked through their declared limits with a
simulated device (AttentionSignature with a compute capability) and through fake flash_attn/xformers modules.
GPU tests (`gpu`) compare each available backend with the math backend in bf16 at DiT-XL's head dim 72.
"""
import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.attention import SDPBackend, sdpa_kernel

from coredi_kernels.attention import (
    ATTENTION_BACKENDS,
    BACKEND_NAMES,
    ENV_VAR,
    AttentionSignature,
    attention,
    attention_priority,
    explain_attention,
    force_attention_backend,
    select_attention_backend,
)
from coredi_kernels.attention import base, dispatch, external, sdpa

CPU_BACKENDS = ["sdpa_flash", "sdpa_math"]
CUDA_ONLY = ["sdpa_cudnn", "sdpa_efficient", "flash_attn_2", "flash_attn_3", "xformers"]
SHAPES = [(2, 3, 17, 72), (1, 2, 5, 8), (3, 1, 1, 16), (2, 2, 33, 40)]  # (B, H, T, D): odd T, T = 1, D = 72
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test sees no env override and empty caches (choices, imports, probes)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    dispatch.clear_attention_cache()


def reference_attention(q, k, v, scale=None):
    """softmax(q kᵀ · scale) v in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def make_qkv(shape, dtype=torch.float32, device="cpu", requires_grad=False, seq_k=None):
    B, H, T, D = shape
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    k_shape = (B, H, seq_k or T, D)
    tensors = [torch.randn(s, generator=g) * 1.5 for s in (shape, k_shape, k_shape)]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def fake_signature(capability, dtype=torch.bfloat16, head_dim=72, requires_grad=True, seq=256, contiguous=True):
    """A CUDA call as a DiT-XL layer makes it, on a GPU that need not exist."""
    return AttentionSignature(
        device=torch.device("cuda", 0), dtype=dtype, batch=8, heads=16, seq_q=seq, seq_k=seq, head_dim=head_dim,
        head_dim_v=head_dim, last_dim_contiguous=contiguous, aligned=True, requires_grad=requires_grad,
        capability=capability,
    )


@pytest.fixture
def everything_installed(monkeypatch):
    """Pretend every package is installed and every runtime check (torch's verdict, imports, probes) passes."""
    monkeypatch.setattr(base, "is_installed", lambda module: True)
    for backend in ATTENTION_BACKENDS.values():
        monkeypatch.setattr(backend, "runtime_reasons", lambda sig: [])


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients of the backends that run on CPU
# ---------------------------------------------------------------------------------------------------------------


def test_reference_matches_the_textbook_formula_on_a_hand_computed_case():
    q = torch.tensor([[[[1.0, 0.0]]]])                       # (1, 1, 1, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])           # (1, 1, 2, 2)
    v = torch.tensor([[[[2.0, 0.0], [0.0, 4.0]]]])
    w = torch.softmax(torch.tensor([1.0, 0.0]) / 2**0.5, 0)  # scores q·k / sqrt(2)
    expected = w[0] * v[0, 0, 0] + w[1] * v[0, 0, 1]
    torch.testing.assert_close(reference_attention(q, k, v)[0, 0, 0].float(), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_matches_float64_reference(backend, dtype, shape):
    q, k, v = make_qkv(shape, dtype)
    out = attention(q, k, v, backend=backend)
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_float64_reference(backend, dtype):
    q, k, v = make_qkv((2, 3, 17, 72), dtype, requires_grad=True, seq_k=11)
    cotangent = torch.randn(2, 3, 17, 72)
    grads = torch.autograd.grad(attention(q, k, v, backend=backend), (q, k, v), cotangent.to(dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(reference_attention(q64, k64, v64), (q64, k64, v64), cotangent.double())
    tol = dict(atol=5e-5, rtol=5e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for name, got, want in zip("qkv", grads, expected):
        torch.testing.assert_close(got.double(), want, **tol, msg=f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_qkv_views_and_explicit_scale(backend):
    """DiT's q, k, v are strided views of one (B, T, 3, H, D) projection; a custom scale is honoured."""
    B, T, H, D = 2, 9, 3, 24
    qkv = torch.randn(B, T, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v, backend=backend, scale=0.3)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=0.3), atol=2e-5, rtol=2e-5)


def test_auto_runs_sdpa_flash_on_cpu_and_math_when_the_last_dim_is_strided():
    q, k, v = make_qkv((2, 2, 7, 16))
    assert select_attention_backend(q, k, v) == "sdpa_flash"
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (q, k, v)]  # same values, last-dim stride 2
    assert select_attention_backend(*strided) == "sdpa_math"
    torch.testing.assert_close(attention(*strided).double(), reference_attention(q, k, v), atol=2e-5, rtol=2e-5)


def test_each_backend_object_reports_no_reasons_for_cpu_fp32():
    q, k, v = make_qkv((2, 2, 7, 16))
    for name in CPU_BACKENDS:
        assert ATTENTION_BACKENDS[name].not_supported_reasons(q, k, v) == [], name


# ---------------------------------------------------------------------------------------------------------------
# Refusals: forcing what cannot run here
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CUDA_ONLY)
def test_forcing_a_cuda_backend_on_cpu_raises_with_its_reasons(backend):
    q, k, v = make_qkv((2, 3, 17, 72))
    with pytest.raises(ValueError) as info:
        attention(q, k, v, backend=backend)
    message = str(info.value)
    assert f"'{backend}' was forced but cannot run" in message
    assert "runs on cuda tensors, the inputs are on cpu" in message
    package = ATTENTION_BACKENDS[backend].package
    if package is not None and not base.is_installed(package):
        assert f"`{package}` is not installed" in message


def test_explain_lists_every_backend_with_status_and_reasons():
    q, k, v = make_qkv((2, 3, 17, 72), requires_grad=True)
    table = explain_attention(q, k, v)
    lines = {line.split()[1]: line for line in table.splitlines()[2:]}
    assert set(lines) == set(BACKEND_NAMES)
    assert "q (2, 3, 17, 72), Tk=17, float32 on cpu, with grad; requested: auto" in table.splitlines()[0]
    assert lines["sdpa_flash"].split()[:3] == ["1", "sdpa_flash", "CHOSEN"]
    assert lines["sdpa_math"].split()[:3] == ["2", "sdpa_math", "usable"]
    assert "a backend ranked higher was" in lines["sdpa_math"]
    for name in CUDA_ONLY:
        assert lines[name].split()[:3] == ["-", name, "unsupported"] and "inputs are on cpu" in lines[name]
    forced = explain_attention(q, k, v, backend="sdpa_cudnn")
    assert "requested: sdpa_cudnn" in forced and "attention() raises ValueError" in forced


def test_bad_inputs_raise_errors_naming_the_argument():
    q, k, v = make_qkv((2, 3, 5, 8))
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must be"):
        attention(q, k[:, :2], v)
    with pytest.raises(ValueError, match="v must be"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="v is torch.float64"):
        attention(q, k, v.double())
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attention(q, "k", v)
    with pytest.raises(TypeError, match="scale must be a float"):
        attention(q, k, v, scale=True)
    with pytest.raises(ValueError, match=r"attention\(backend=...\) must be 'auto' or one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="force_attention_backend"):
        with force_attention_backend("cudnn"):
            pass


# ---------------------------------------------------------------------------------------------------------------
# Selection on simulated GPUs
# ---------------------------------------------------------------------------------------------------------------


def test_priority_lists():
    hopper = attention_priority("cuda", (9, 0))
    assert hopper[:3] == ("sdpa_cudnn", "flash_attn_3", "flash_attn_2") and hopper[-1] == "sdpa_math"
    for capability in [(8, 0), (8, 9), (10, 0), (12, 0)]:
        order = attention_priority("cuda", capability)
        assert order.index("flash_attn_2") < order.index("sdpa_flash") < order.index("sdpa_cudnn"), capability
    assert attention_priority("cpu") == ("sdpa_flash", "sdpa_math")
    for order in (hopper, attention_priority("cuda", (8, 0))):
        assert sorted(order) == sorted(BACKEND_NAMES)


@pytest.mark.parametrize("capability, expected", [((9, 0), "sdpa_cudnn"), ((8, 0), "flash_attn_2"),
                                                  ((8, 9), "flash_attn_2"), ((10, 0), "flash_attn_2")])
def test_auto_choice_per_gpu_when_everything_is_installed(everything_installed, capability, expected):
    assert dispatch.choose(fake_signature(capability), "auto") == (expected, "")


def test_choice_walks_down_the_list_past_each_declared_limit(everything_installed):
    # fp32: cuDNN, FA3, FA2 and flash want fp16/bf16; memory-efficient takes fp32.
    assert dispatch.choose(fake_signature((9, 0), dtype=torch.float32), "auto")[0] == "sdpa_efficient"
    # Training at head dim 200 on an RTX 4090 (sm89): FA2's and flash's backward refuse (192, 224].
    assert dispatch.choose(fake_signature((8, 9), head_dim=200), "auto")[0] == "sdpa_cudnn"
    assert dispatch.choose(fake_signature((8, 9), head_dim=200, requires_grad=False), "auto")[0] == "flash_attn_2"
    # Volta: nothing but memory-efficient (fp16) and math.
    assert dispatch.choose(fake_signature((7, 0), dtype=torch.float16), "auto")[0] == "sdpa_efficient"
    assert dispatch.choose(fake_signature((7, 0), dtype=torch.bfloat16), "auto")[0] == "sdpa_math"
    # A strided last dim rules out every fused kernel.
    assert dispatch.choose(fake_signature((9, 0), contiguous=False), "auto")[0] == "sdpa_math"


def test_declared_reasons_are_specific(everything_installed):
    ampere = fake_signature((8, 0))
    assert ATTENTION_BACKENDS["flash_attn_3"].reasons(ampere) == ["needs compute capability >= 9.0, this GPU is sm80"]
    assert ATTENTION_BACKENDS["flash_attn_3"].reasons(fake_signature((10, 0))) == [
        "needs compute capability <= 9.0, this GPU is sm100"
    ]
    odd = fake_signature((9, 0), head_dim=38)
    assert "head dim 38 is not a multiple of 8" in ATTENTION_BACKENDS["sdpa_cudnn"].reasons(odd)
    big = fake_signature((9, 0), head_dim=320)
    assert "head dim 320 > 256" in ATTENTION_BACKENDS["flash_attn_2"].reasons(big)
    fp32 = fake_signature((9, 0), dtype=torch.float32)
    assert ATTENTION_BACKENDS["sdpa_flash"].reasons(fp32) == ["dtype float32 is not one of float16, bfloat16"]


def test_hopper_without_packages_and_with_cudnn_refused_falls_to_torch_flash(monkeypatch, everything_installed):
    monkeypatch.setattr(base, "is_installed", lambda module: False)
    monkeypatch.setattr(ATTENTION_BACKENDS["sdpa_cudnn"], "runtime_reasons", lambda sig: ["cuDNN too old"])
    name, _ = dispatch.choose(fake_signature((9, 0)), "auto")
    assert name == "sdpa_flash"
    name, error = dispatch.choose(fake_signature((9, 0)), "sdpa_cudnn")
    assert name is None and error.endswith("cuDNN too old. Use 'auto' or another backend; explain_attention(q, k, "
                                           "v) lists them all.")


def test_explain_on_a_simulated_hopper(monkeypatch, everything_installed):
    monkeypatch.setattr(ATTENTION_BACKENDS["flash_attn_2"], "runtime_reasons", lambda sig: ["flash_attn 1.0.9 is "
                                                                                             "installed"])
    table = dispatch.explain(fake_signature((9, 0)), "auto").splitlines()
    assert table[0] == "attention for q (8, 16, 256, 72), Tk=256, bfloat16 on cuda:0 (sm90), with grad; requested: auto"
    rows = [line.split(None, 3) for line in table[2:]]
    assert [row[1] for row in rows] == list(attention_priority("cuda", (9, 0)))
    assert rows[0][:3] == ["1", "sdpa_cudnn", "CHOSEN"]
    assert rows[1][2:] == ["usable", "not chosen: a backend ranked higher was"]
    assert rows[2][2:] == ["unsupported", "flash_attn 1.0.9 is installed"]


def test_select_attention_backend_accepts_a_capability_for_cuda_inputs_only():
    q, k, v = make_qkv((2, 3, 17, 72))
    # CPU tensors ignore the simulated capability: the CPU list applies.
    assert select_attention_backend(q, k, v, device_capability=(9, 0)) == "sdpa_flash"
    assert AttentionSignature.of(q, k, v, device_capability=(9, 0)).capability is None


# ---------------------------------------------------------------------------------------------------------------
# Overrides and the cache
# ---------------------------------------------------------------------------------------------------------------


class CallCounter:
    """Wraps a backend and counts the calls that reach its kernel."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


@pytest.fixture
def counters(monkeypatch):
    spies = {name: CallCounter(ATTENTION_BACKENDS[name]) for name in CPU_BACKENDS}
    for name, spy in spies.items():
        monkeypatch.setitem(ATTENTION_BACKENDS, name, spy)
    return spies


def test_overrides_argument_beats_context_beats_environment(monkeypatch, counters):
    q, k, v = make_qkv((1, 2, 5, 8))
    attention(q, k, v)
    assert (counters["sdpa_flash"].calls, counters["sdpa_math"].calls) == (1, 0)
    monkeypatch.setenv(ENV_VAR, "sdpa_math")
    attention(q, k, v)
    assert counters["sdpa_math"].calls == 1
    with force_attention_backend("sdpa_flash"):
        attention(q, k, v)
        assert counters["sdpa_flash"].calls == 2
        with force_attention_backend("auto"):  # nested: back to the priority list, the env is not consulted
            attention(q, k, v)
            assert counters["sdpa_flash"].calls == 3
        attention(q, k, v, backend="sdpa_math")
        assert counters["sdpa_math"].calls == 2
    monkeypatch.setenv(ENV_VAR, "not_a_backend")
    with pytest.raises(ValueError, match=rf"\${ENV_VAR} must be 'auto' or one of"):
        attention(q, k, v)
    monkeypatch.setenv(ENV_VAR, "xformers")
    with pytest.raises(ValueError, match="'xformers' was forced"):
        attention(q, k, v)


def test_torch_global_switches_are_honoured_and_part_of_the_cache_key(counters):
    q, k, v = make_qkv((1, 2, 5, 8))
    attention(q, k, v)
    with sdpa_kernel([SDPBackend.MATH]):  # an enclosing context switches torch's flash kernel off
        assert select_attention_backend(q, k, v) == "sdpa_math"
        attention(q, k, v)
        assert "flash SDPA is switched off" in explain_attention(q, k, v)
    attention(q, k, v)
    assert (counters["sdpa_flash"].calls, counters["sdpa_math"].calls) == (2, 1)


def test_choice_is_cached_per_kind_of_call(monkeypatch):
    calls = []
    real_choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda sig, req: calls.append(sig) or real_choose(sig, req))
    q, k, v = make_qkv((1, 2, 5, 8))
    for _ in range(3):
        attention(q, k, v)
    assert len(calls) == 1
    attention(*make_qkv((1, 2, 6, 8)))                   # another sequence length: a new choice
    attention(*make_qkv((1, 2, 5, 8), requires_grad=True))  # gradients needed: a new choice
    assert [sig.seq_q for sig in calls] == [5, 6, 5] and [sig.requires_grad for sig in calls] == [False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


def compile_and_keep_aten_graph(fn):
    """torch.compile(fn, fullgraph=True) through AOT autograd, keeping the forward aten graphs' code."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep)), graphs


def test_torch_compile_fullgraph_bakes_the_choice_into_the_graph():
    q, k, v = make_qkv((2, 3, 9, 24), requires_grad=True)
    compiled, graphs = compile_and_keep_aten_graph(lambda q, k, v: attention(q, k, v) * 2)
    out = compiled(q, k, v)
    torch.testing.assert_close(out.double(), 2 * reference_attention(q, k, v), atol=5e-5, rtol=5e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    eager = torch.autograd.grad((attention(q, k, v) * 2).sum(), (q, k, v))
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in graphs[-1]  # sdpa_flash, chosen at trace time

    with force_attention_backend("sdpa_math"):
        compiled, graphs = compile_and_keep_aten_graph(lambda q, k, v: attention(q, k, v))
        torch.testing.assert_close(compiled(q, k, v).double(), reference_attention(q, k, v), atol=5e-5, rtol=5e-5)
    assert "flash_attention" not in graphs[-1] and "aten.bmm" in graphs[-1]  # the math decomposition


def test_torch_compile_with_dynamic_shapes_keeps_one_graph_for_every_length():
    """Symbolic batch and sequence lengths (dynamic=True, or automatic dynamic after a second shape, as JiT's
    in-context tokens cause) must neither break the graph (fullgraph) nor specialize the graph to one length."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    compiled = torch.compile(lambda q, k, v: attention(q, k, v), fullgraph=True, dynamic=True,
                             backend=aot_autograd(fw_compiler=keep))
    for shape in ((2, 3, 9, 24), (3, 3, 17, 24), (4, 3, 40, 24)):  # (dynamo specializes lengths 0 and 1)
        q, k, v = make_qkv(shape)
        torch.testing.assert_close(compiled(q, k, v).double(), reference_attention(q, k, v), atol=5e-5, rtol=5e-5)
    assert len(graphs) == 1  # one graph, symbolic in B and T
    # A length the backends do care about (seq_k = 1) is a fact of the key, guarded, not lost to the stand-in.
    q, k, v = make_qkv((2, 3, 9, 24), seq_k=1)
    torch.testing.assert_close(compiled(q, k, v).double(), reference_attention(q, k, v), atol=5e-5, rtol=5e-5)


# ---------------------------------------------------------------------------------------------------------------
# torch's own reasons, flash_attn and xformers through stand-in modules
# ---------------------------------------------------------------------------------------------------------------


def test_native_warnings_of_torch_checks_are_captured():
    """torch.backends.cuda.can_use_flash_attention(debug=True) explains itself on stderr; we read it back."""
    q, k, v = make_qkv((1, 2, 5, 8))
    params = sdpa._sdpa_params(q, k, v)
    messages = sdpa.capture_native_warnings(lambda: torch.backends.cuda.can_use_flash_attention(params, True))
    assert any("All tensors need to be on cuda device" in m and "device: cpu" in m for m in messages), messages


@pytest.mark.parametrize("check", ["can_use_flash_attention", "can_use_efficient_attention"])
def test_torch_verdict_on_stand_in_tensors_returns_torchs_reason(check):
    """The stand-ins carry the call's shapes, dtype, device and grad flag; torch refuses CPU tensors, saying why."""
    sig = AttentionSignature.of(*make_qkv((2, 3, 17, 72), requires_grad=True))
    reasons = sdpa.torch_verdict(check, sig)
    assert len(reasons) == 1 and reasons[0].startswith("All tensors need to be on cuda device. Got query on device: "
                                                       "cpu"), reasons
    q, k, v = sdpa._probe_tensors(sig)
    assert q.shape == (2, 3, 17, 72) and v.requires_grad and q.untyped_storage().nbytes() == 72 * 4


class FakeFlashAttn:
    """flash_attn's API ((B, T, H, D) layout, softmax_scale) on top of torch's math, to test our layout handling."""

    __version__ = "2.8.3"

    def __init__(self):
        self.layouts = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert dropout_p == 0.0 and not causal
        self.layouts.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale)
        return out.transpose(1, 2)


@pytest.mark.parametrize("name, module", [("flash_attn_2", "flash_attn"), ("flash_attn_3", "flash_attn_interface")])
def test_flash_attn_backends_pass_bthd_views_and_the_scale(monkeypatch, name, module):
    fake = FakeFlashAttn()
    monkeypatch.setattr(external, "import_optional", lambda m: (fake, None) if m == module else (None, "absent"))
    q, k, v = make_qkv((2, 3, 7, 16), seq_k=5)
    out = ATTENTION_BACKENDS[name](q, k, v, 0.7)
    assert fake.layouts == [(2, 7, 3, 16)]  # (B, T, H, D)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=0.7), atol=2e-5, rtol=2e-5)
    assert ATTENTION_BACKENDS[name].runtime_reasons(fake_signature((9, 0))) == []


class FakeXformers:
    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.__coredi_import_warnings__ = ["xFormers was built for: PyTorch 2.10.0+cu128 (you have 2.11.0)"]

    def memory_efficient_attention(self, q, k, v, scale=None):
        if self.behaviour == "broken":
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2) * (1.5 if self.behaviour == "wrong" else 1.0)


@pytest.mark.parametrize("behaviour", ["works", "broken", "wrong"])
def test_xformers_is_trusted_only_after_a_probe_call(monkeypatch, behaviour):
    fake = FakeXformers(behaviour)
    monkeypatch.setattr(external, "import_optional", lambda m: (fake, None))
    cpu_sig = AttentionSignature.of(*make_qkv((1, 2, 5, 16), requires_grad=True))
    reasons = ATTENTION_BACKENDS["xformers"].runtime_reasons(cpu_sig)
    if behaviour == "works":
        assert reasons == []
        q, k, v = make_qkv((2, 3, 7, 16))
        torch.testing.assert_close(ATTENTION_BACKENDS["xformers"](q, k, v, None).double(),
                                   reference_attention(q, k, v), atol=2e-5, rtol=2e-5)
    elif behaviour == "broken":
        assert reasons[0].startswith("xformers is installed but its kernel fails here: NotImplementedError: No "
                                     "operator found")
        assert reasons[1] == "xformers warned at import: xFormers was built for: PyTorch 2.10.0+cu128 (you have " \
                             "2.11.0)"
    else:
        assert reasons[0].startswith("xformers runs but its result is off by")


def test_failed_imports_become_reasons():
    module, reason = external.import_optional("coredi_no_such_module_for_tests")
    assert module is None and reason.startswith("`import coredi_no_such_module_for_tests` failed: ModuleNotFoundError")


# ---------------------------------------------------------------------------------------------------------------
# GPU: every backend that runs on this GPU against the math backend, bf16, DiT-XL's head dim 72
# ---------------------------------------------------------------------------------------------------------------


def _gpu_backends():
    if not torch.cuda.is_available():
        return []
    q, k, v = make_qkv((2, 16, 256, 72), torch.bfloat16, "cuda", requires_grad=True)
    return [name for name in BACKEND_NAMES if not ATTENTION_BACKENDS[name].not_supported_reasons(q, k, v)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "sdpa_math"])
def test_gpu_backend_matches_math_in_bf16(backend):
    q, k, v = make_qkv((4, 16, 257, 72), torch.bfloat16, "cuda", requires_grad=True)
    reasons = ATTENTION_BACKENDS[backend].not_supported_reasons(q, k, v)
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")
    cotangent = torch.randn_like(q)
    out = attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    ref = reference_attention(q, k, v)
    math = attention(q, k, v, backend="sdpa_math")
    math_grads = torch.autograd.grad(math, (q, k, v), cotangent)
    # Two-reference budget: no more than 2x the error torch's own bf16 math makes against float64 (+ a floor).
    assert (out.double() - ref).abs().max() <= 2 * (math.double() - ref).abs().max() + 1e-3
    for got, want in zip(grads, math_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_auto_choice_follows_the_priority_list():
    q, k, v = make_qkv((2, 16, 256, 72), torch.bfloat16, "cuda", requires_grad=True)
    capability = torch.cuda.get_device_capability()
    usable = _gpu_backends()
    expected = next(name for name in attention_priority("cuda", capability) if name in usable)
    assert select_attention_backend(q, k, v) == expected
    print(explain_attention(q, k, v))
    if capability == (9, 0):
        assert expected == "sdpa_cudnn"


@pytest.mark.gpu
def test_gpu_compile_fullgraph_runs_the_chosen_kernel():
    q, k, v = make_qkv((2, 16, 256, 72), torch.bfloat16, "cuda", requires_grad=True)
    chosen = select_attention_backend(q, k, v)
    compiled, graphs = compile_and_keep_aten_graph(lambda q, k, v: attention(q, k, v))
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v), atol=2e-2, rtol=2e-2)
    aten_op = {"sdpa_cudnn": "_scaled_dot_product_cudnn_attention", "sdpa_flash": "_scaled_dot_product_flash_attention",
               "sdpa_efficient": "_scaled_dot_product_efficient_attention"}.get(chosen)
    if aten_op is not None:
        assert f"aten.{aten_op}" in graphs[-1], (chosen, graphs[-1])
    inductor = torch.compile(lambda q, k, v: attention(q, k, v), fullgraph=True)
    torch.testing.assert_close(inductor(q, k, v), attention(q, k, v), atol=2e-2, rtol=2e-2)

