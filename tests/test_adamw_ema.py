"""AdamWEMA (AdamW + fp32 EMA in one pass), both backends, against independent references.

* the parameters and moments follow `torch.optim.AdamW` over several steps with three parameter groups (different
  lr / weight decay / betas / eps), weight decay and bias correction, a step with zero gradients and steps where a
  parameter has no gradient (torch then skips it: its own step count, so its own bias correction);
* the EMA follows a separately written fp32 EMA of the reference weights, and a float64 one;
* fp32 and bf16 parameters (moments in the parameter dtype, as torch), and bf16 with fp32 master weights;
* state_dict round trips (through torch.save / weights_only load) continue bit-identically; torch.optim.AdamW state
  dicts load; the EMA keeps fp32 and can be left out of the state dict;
* bad arguments fail at construction naming the argument; the native op checks its inputs;
* on a GPU: the CUDA kernel gives bit-identical results to the CPU kernel, across launches and alignments.

The native CPU kernel is tested when the library is built (`python -m coredi_fast.optim.native build`); CI builds
it, and there (CI=1 or COREDI_REQUIRE_NATIVE=1) a missing library fails `test_native_library_is_built`.
"""
import io
import os

import pytest
import torch
import torch.nn as nn

from coredi_fast.optim import AdamWEMA, native, resolve_fused_ema

NATIVE_MISSING = not native.is_available("cpu")
NATIVE_REASON = f"native library not built: {native.load().describe()}"
BACKENDS = [pytest.param("native", marks=pytest.mark.skipif(NATIVE_MISSING, reason=NATIVE_REASON)), "torch"]

# Odd sizes; 40_000 elements cross the CPU kernel's 32_768-element chunk boundary.
SHAPES = [(7, 5), (40_000,), (1,), (33, 17), (3, 4, 5)]
GROUPS = [  # (indices into SHAPES, group options)
    ([0, 1], dict(lr=1e-2, weight_decay=0.1, ema_decay=0.9)),
    ([2, 3], dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6, ema_decay=0.5)),
    ([4], dict(lr=5e-3, weight_decay=0.3, eps=1e-4, ema_decay=0.99)),
]
STEPS = 6
ZERO_GRAD_STEP = 2           # every gradient is zero at this step (weight decay and momentum still act)
NO_GRAD = {3: [1], 4: [1, 4]}  # step -> parameters with grad None at that step


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def groups_of(params, with_ema_decay=True):
    out = []
    for indices, options in GROUPS:
        opts = dict(options) if with_ema_decay else {k: v for k, v in options.items() if k != "ema_decay"}
        out.append(dict(opts, params=[params[i] for i in indices]))
    return out


def ema_decay_of(index):
    return next(o["ema_decay"] for ids, o in GROUPS if index in ids)


def gradients(step, dtype):
    """The gradients of `step` (None where the schedule says so), identical for every optimizer under test."""
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    if step == ZERO_GRAD_STEP:
        grads = [torch.zeros_like(x) for x in grads]
    for i in NO_GRAD.get(step, []):
        grads[i] = None
    return grads


def set_grads(params, grads):
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad.clone()


def reference_run(dtype, steps=STEPS):
    """torch.optim.AdamW (the fused kernel for bf16: fp32 math rounded once, as ours) + an fp32 and a float64 EMA
    of its weights, each written out here."""
    params = make_params(dtype)
    opt = torch.optim.AdamW(groups_of(params, with_ema_decay=False), fused=dtype != torch.float32)
    ema32 = [p.detach().float().clone() for p in params]
    ema64 = [p.detach().double().clone() for p in params]
    for step in range(steps):
        set_grads(params, gradients(step, dtype))
        opt.step()
        for i, p in enumerate(params):  # every parameter, with or without a gradient this step
            w = 1.0 - ema_decay_of(i)
            ema32[i] = ema32[i] + w * (p.detach().float() - ema32[i])
            ema64[i] = ema64[i] + w * (p.detach().double() - ema64[i])
    return params, opt, ema32, ema64


def our_run(dtype, backend, steps=STEPS, **kwargs):
    params = make_params(dtype)
    opt = AdamWEMA(groups_of(params), backend=backend, **kwargs)
    for step in range(steps):
        set_grads(params, gradients(step, dtype))
        opt.step()
    return params, opt


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}


def test_native_library_is_built():
    if not (os.environ.get("CI") or os.environ.get(native.ENV_REQUIRE)):
        pytest.skip("the native library is optional here (CI=1 or COREDI_REQUIRE_NATIVE=1 make it required)")
    assert native.is_available("cpu"), native.load().describe()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_adamw_and_an_independent_ema(backend, dtype):
    ref_params, ref_opt, ema32, ema64 = reference_run(dtype)
    params, opt = our_run(dtype, backend)
    assert opt.backend == backend
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert p.dtype == dtype
        torch.testing.assert_close(p, r, **TOL[dtype], msg=f"param {i}")
        ours, theirs = opt.state[p], ref_opt.state[r]
        assert float(ours["step"]) == float(theirs["step"]) == STEPS - sum(i in v for v in NO_GRAD.values())
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours[key].dtype == dtype
            torch.testing.assert_close(ours[key], theirs[key], **TOL[dtype], msg=f"{key} {i}")
        assert ours["ema"].dtype == torch.float32
        torch.testing.assert_close(ours["ema"], ema32[i], **TOL[dtype], msg=f"ema {i}")
        torch.testing.assert_close(ours["ema"].double(), ema64[i], rtol=TOL[dtype]["rtol"], atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_master_weights_follow_an_fp32_adamw(backend):
    """With master_weights, bf16 parameters are the rounded fp32 master, which follows fp32 AdamW on fp32 grads;
    the EMA follows the master (not the rounded parameter)."""
    ref = make_params(torch.float32)
    ref = [nn.Parameter(p.detach().to(torch.bfloat16).float()) for p in ref]  # start from the bf16 values
    ref_opt = torch.optim.AdamW(groups_of(ref, with_ema_decay=False))
    ema = [p.detach().clone() for p in ref]
    params, opt = make_params(torch.bfloat16), None
    opt = AdamWEMA(groups_of(params), master_weights=True, backend=backend)
    for step in range(STEPS):
        grads = gradients(step, torch.bfloat16)
        set_grads(params, grads)
        set_grads(ref, [None if g is None else g.float() for g in grads])
        opt.step()
        ref_opt.step()
        for i, r in enumerate(ref):
            ema[i] = ema[i] + (1.0 - ema_decay_of(i)) * (r.detach() - ema[i])
    for i, (p, r) in enumerate(zip(params, ref)):
        state = opt.state[p]
        assert state["master"].dtype == state["exp_avg"].dtype == state["ema"].dtype == torch.float32
        torch.testing.assert_close(state["master"], r.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, state["master"].to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(state["ema"], ema[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_state_dict_round_trip_continues_identically(backend, dtype, master):
    params, opt = our_run(dtype, backend, steps=3, master_weights=master)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    restored = AdamWEMA(groups_of(clones), backend=backend, master_weights=master)
    restored.load_state_dict(saved)
    for p in clones:  # fp32 state stays fp32 (torch's load would cast it to the parameter's dtype)
        assert restored.state[p]["ema"].dtype == torch.float32
        if master:
            assert restored.state[p]["master"].dtype == restored.state[p]["exp_avg"].dtype == torch.float32
    for step in range(3, STEPS):
        grads = gradients(step, dtype)
        set_grads(params, grads)
        set_grads(clones, grads)
        opt.step()
        restored.step()
    for p, c in zip(params, clones):
        torch.testing.assert_close(c, p, rtol=0, atol=0)
        for key in ("ema", "exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(restored.state[c][key], opt.state[p][key], rtol=0, atol=0)


def test_ema_can_be_left_out_of_the_state_dict_and_is_kept_on_load():
    params, opt = our_run(torch.float32, "torch", steps=2)
    opt.ema_in_state_dict = False
    saved = opt.state_dict()
    assert all("ema" not in s and "exp_avg" in s for s in saved["state"].values())
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    other = AdamWEMA(groups_of(clones), backend="torch", ema_in_state_dict=False)
    held = [other.ema_of(c).fill_(7.0) for c in clones]  # e.g. restored from a checkpoint's "ema" entry first
    other.load_state_dict(saved)
    for p, c, e in zip(params, clones, held):
        assert other.state[c]["ema"] is e and bool((e == 7.0).all())
        torch.testing.assert_close(other.state[c]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loads_a_torch_adamw_state_dict(backend):
    """Switching a run from torch.optim.AdamW to AdamWEMA keeps its moments and step counts."""
    ref_params, ref_opt, _, _ = reference_run(torch.float32, steps=3)
    params = [nn.Parameter(p.detach().clone()) for p in ref_params]
    opt = AdamWEMA(groups_of(params), backend=backend)
    opt.load_state_dict(ref_opt.state_dict())
    for step in range(3, STEPS):
        grads = gradients(step, torch.float32)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **TOL[torch.float32])


def test_ema_state_dict_uses_model_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.pos = nn.Parameter(torch.arange(4.0), requires_grad=False)  # frozen, like SiT's pos_embed
            self.register_buffer("count", torch.tensor(5))

        def forward(self, x):
            return self.lin(x)

    net = Net()
    opt = AdamWEMA([p for p in net.parameters() if p.requires_grad], lr=0.1, ema_decay=0.75, backend="torch")
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    ema = opt.ema_state_dict(net)
    assert list(ema) == list(net.state_dict())
    for name in ("lin.weight", "lin.bias"):
        expected = before[name] + 0.25 * (net.state_dict()[name] - before[name])
        torch.testing.assert_close(ema[name], expected)
    torch.testing.assert_close(ema["pos"], torch.arange(4.0))
    assert ema["count"].item() == 5
    copy = Net()
    copy.load_state_dict(ema)  # loads strictly into the same architecture

    no_ema = AdamWEMA([{"params": [net.lin.weight], "ema": False}, {"params": [net.lin.bias]}], backend="torch")
    with pytest.raises(ValueError, match="lin.weight"):
        no_ema.ema_state_dict(net)
    assert len(no_ema.ema_parameters()) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(ema_decay=1.5), "ema_decay"),
    (dict(backend="cuda"), "backend"),
    (dict(lr=float("nan")), "lr"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamWEMA([nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_groups_and_parameters_fail_naming_them():
    with pytest.raises(ValueError, match="param group 1: weight_decay"):
        AdamWEMA([{"params": [nn.Parameter(torch.zeros(2))]},
                  {"params": [nn.Parameter(torch.zeros(2))], "weight_decay": -1.0}])
    with pytest.raises(TypeError, match="lr must be a Python number"):
        AdamWEMA([nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        AdamWEMA([torch.zeros(2, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="optim.fused_ema"):
        resolve_fused_ema("yes", torch.device("cpu"))


@pytest.mark.skipif(NATIVE_MISSING, reason=NATIVE_REASON)
def test_native_op_checks_its_inputs():
    op = torch.ops.coredi_native.adamw_ema_step_
    p, g = torch.zeros(4), torch.ones(4)
    m, v, e = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="grads has 0 tensors"):
        op([p], [], [m], [v], [e], [], [1], 0.1, 0.9, 0.999, 1e-8, 0.0, 0.9)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has 3 elements"):
        op([p], [g], [torch.zeros(3)], [v], [e], [], [1], 0.1, 0.9, 0.999, 1e-8, 0.0, 0.9)
    with pytest.raises(RuntimeError, match=r"emas\[0\] must be float32"):
        op([p], [g], [m], [v], [e.double()], [], [1], 0.1, 0.9, 0.999, 1e-8, 0.0, 0.9)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be >= 1"):
        op([p], [g], [m], [v], [e], [], [0], 0.1, 0.9, 0.999, 1e-8, 0.0, 0.9)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op([torch.zeros(4, 2).t()], [torch.zeros(2, 4)], [m.view(2, 2)], [v.view(2, 2)], [], [], [1],
           0.1, 0.9, 0.999, 1e-8, 0.0, 0.9)
    # One step by hand: m = 0.1 g, v = 0.001 g^2, bias-corrected m^ = g, v^ = g^2 -> w -= lr * g / (|g| + eps).
    op([p], [g], [m], [v], [e], [], [1], 0.1, 0.9, 0.999, 1e-8, 0.0, 0.75)
    torch.testing.assert_close(p, torch.full((4,), -0.1 / (1 + 1e-8)))
    torch.testing.assert_close(e, 0.25 * p)


@pytest.mark.gpu
@pytest.mark.skipif(not native.is_available("cuda"), reason="native CUDA kernel not built")
@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_cuda_kernel_matches_the_cpu_kernel_bitwise(dtype, master):
    """Both kernels do the same fp32 operations without FMA contraction: identical bits. 45 tensors (two tensor
    batches per launch), one of 320 * 65536 + 1000 elements (more chunks than one launch takes) and one that starts
    off a 16-byte boundary (the scalar path)."""
    g = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 5000, (44,), generator=g)] + [320 * 65536 + 1000]
    base = [torch.randn(n + 1, generator=g) for n in sizes]
    cpu = [b[1:].to(dtype) if i == 3 else b[:-1].to(dtype) for i, b in enumerate(base)]
    grads = [torch.randn(n, generator=g).to(dtype) for n in sizes]

    def run(device):
        params = [nn.Parameter(p.clone().to(device)) for p in cpu]
        if device == "cuda":  # keep tensor 3 misaligned on the GPU too
            storage = torch.empty(sizes[3] + 1, dtype=dtype, device=device)
            storage[1:].copy_(cpu[3])
            params[3] = nn.Parameter(storage[1:])
        opt = AdamWEMA([{"params": params[:20], "lr": 1e-2, "weight_decay": 0.1},
                        {"params": params[20:], "lr": 3e-3}], master_weights=master, backend="native")
        for step in range(3):
            for p, grad in zip(params, grads):
                p.grad = (grad * (step + 1)).to(device)
            opt.step()
        return [p.detach().cpu() for p in params], [opt.state[p]["ema"].cpu() for p in params]

    cpu_params, cpu_emas = run("cpu")
    gpu_params, gpu_emas = run("cuda")
    for a, b in zip(cpu_params + cpu_emas, gpu_params + gpu_emas):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_without_a_usable_library_auto_falls_back_and_native_explains(tmp_path):
    # A file that is not a library where $COREDI_NATIVE_LIB points: load() reports why, "auto" uses torch's kernels,
    # "native" refuses with that reason. (A subprocess: this process may have loaded the real library already.)
    import subprocess
    import sys

    bogus = tmp_path / "libcoredi_native.so"
    bogus.write_text("not a shared library")
    code = ("import torch; from coredi_fast.optim import AdamWEMA, native\n"
            "p = [torch.nn.Parameter(torch.zeros(3))]\n"
            "print('auto ->', AdamWEMA(p).backend)\n"
            "try:\n    AdamWEMA(p, backend='native')\nexcept RuntimeError as e:\n    print('native ->', e)\n")
    env = dict(os.environ, COREDI_NATIVE_LIB=str(bogus))
    env.pop(native.ENV_BUILD, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "auto -> torch" in out.stdout
    assert "native -> AdamWEMA(backend='native'): no native kernel for cpu" in out.stdout
    assert f"{bogus} does not load" in out.stdout


def test_build_from_an_installed_copy_says_where_the_sources_are(monkeypatch, tmp_path):
    # `pip install --target` (the GPU check's install) copies the package without csrc/ and CMakeLists.txt.
    monkeypatch.setattr(native, "REPO_ROOT", tmp_path)
    with pytest.raises(RuntimeError, match=r"no CMakeLists.txt in .*build from a checkout"):
        native.build(tmp_path / "build", cpu_only=True)
