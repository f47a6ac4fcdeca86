"""coredi_kernels joint embedding: every output and gradient against float64 math, both backends.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny. The
float64 oracle is `reference.joint_embedding_ref` (F.batch_norm, F.interpolate, F.conv2d); the op against the real
coredi_fast training path (`FeatureProjector` + `JointDiffusionObjective` + SiT) is in
test_joint_embedding_vs_objective.py, since this file, like every test_kernel_*.py, imports nothing from
coredi_fast (CI runs it where only coredi-kernels is installed). GPU tests (bf16 error budget, real shapes,
determinism) carry `gpu`.
"""
import os
import socket
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import coredi_kernels
from coredi_kernels import force_backend
from coredi_kernels.joint_embedding import JointEmbedding, _kernels, joint_embedding, op, reference

BACKENDS = ["triton", "torch"]
# Errors are measured relative to the largest reference value (max(1, max|ref|)).
REL_TOL = {torch.float32: 2e-5, torch.float16: 1.5e-2}
OUTPUTS = ("tokens", "target", "z_hat", "projected", "batch_mean", "batch_var", "covariance")
LEAVES = ("weight", "norm_weight", "norm_bias", "patch_weight", "patch_bias", "pos_embed")


@dataclass(frozen=True)
class Case:
    """One configuration: B samples of side² encoder tokens (D channels) projected to d, image C×H×H, patch p."""

    name: str
    B: int = 3
    side: int = 2
    D: int = 20
    d: int = 3
    C: int = 1
    H: int = 4
    p: int = 2
    hidden: int = 24
    keep: bool = False
    affine: bool = False
    normalize: bool = True
    training: bool = True
    learnable: bool = True
    scale: float = 1.0

    @property
    def T(self):
        return (self.H // self.p) ** 2


CASES = [
    Case("resize2-p2-keep-affine", keep=True, affine=True, scale=1.7),  # T = 4: 3 samples in one token tile
    Case("resize2-p1-C4-d8", B=2, d=8, C=4, p=1),  # K = 12, T = 16
    Case("no-resize", B=2, side=4, d=8, C=4, H=4, p=2, keep=True),  # H = grid side, ratio 1
    Case("resize3-T9", C=4, H=6, affine=True),  # odd ratio 3; T = 9 tokens per sample
    Case("eval-running-stats", keep=True, affine=True, training=False),
    Case("pca-no-norm-fixed-W", normalize=False, learnable=False, scale=2.5),  # ReDi: W without gradient
    Case("learned-no-norm", d=8, C=4, normalize=False),
]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """Random inputs; features far from zero mean (exercises the standardization), norm state non-trivial."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(device=device, dtype=dtype)

    L = case.side**2
    inputs = dict(
        features=rnd(case.B, L, case.D, std=2.0, mean=3.0),
        weight=rnd(case.D, case.d, std=0.5),
        x=rnd(case.B, case.C, case.H, case.H),
        noise_x=rnd(case.B, case.C, case.H, case.H),
        noise_z=rnd(case.B, case.d, case.H, case.H),
        t=torch.rand(case.B, generator=g).to(device=device, dtype=dtype),
        patch_weight=rnd(case.hidden, case.C + case.d, case.p, case.p, std=0.3),
        patch_bias=rnd(case.hidden),
        pos_embed=rnd(1, case.T, case.hidden),
        feature_mean=rnd(case.D, mean=3.0),
        feature_std=(torch.rand(case.D, generator=g) + 1.5).to(device=device, dtype=dtype),
        feature_keep=(torch.arange(case.B) % 3 != 1).to(device) if case.keep else None,
    )
    if case.normalize:
        inputs.update(
            running_mean=rnd(case.d, std=0.3),
            running_var=(torch.rand(case.d, generator=g) + 0.5).to(device=device, dtype=dtype),
            norm_weight=rnd(case.d, std=0.3, mean=1.0) if case.affine else None,
            norm_bias=rnd(case.d, std=0.3) if case.affine else None,
        )
    return inputs


def leaves_of(case: Case, inputs):
    names = [n for n in LEAVES if inputs.get(n) is not None]
    return [n for n in names if n != "weight" or case.learnable]


def call(fn, case: Case, inputs, **extra):
    """Run `fn` (joint_embedding or the reference) on copies of the running statistics."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("features", "weight", "x", "noise_x", "noise_z", "t",
                                                             "patch_weight", "patch_bias", "pos_embed")}  # fmt: skip
    for key in ("running_mean", "running_var"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key].detach().clone()
    args = [inputs[k] for k in ("features", "weight", "x", "noise_x", "noise_z", "t", "patch_weight", "patch_bias",
                                "pos_embed")]  # fmt: skip
    out = fn(*args, normalize=case.normalize, training=case.training, feature_scale=case.scale, **kwargs, **extra)
    return out, kwargs.get("running_mean"), kwargs.get("running_var")


def run_op(case, inputs, **extra):
    return call(joint_embedding, case, inputs, momentum=0.3, **extra)


def run_reference(case, inputs):
    """The float64 oracle; the reference returns updated running statistics instead of updating in place."""
    out, _, _ = call(reference.joint_embedding_ref, case, float64(inputs), momentum=0.3, upcast=True)
    return out, out.running_mean, out.running_var


def float64(inputs):
    """float64 copies of the floating-point inputs (float64 ones, e.g. leaves made by `gradients`, pass as they are)."""
    def convert(v):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dtype == torch.float64:
            return v
        return v.detach().double()

    return {k: convert(v) for k, v in inputs.items()}


def cotangents(case: Case, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = case.side**2
    return dict(
        tokens=torch.randn(case.B, case.T, case.hidden, generator=g),
        z_hat=torch.randn(case.B, L, case.d, generator=g),
        covariance=torch.randn(case.d, case.d, generator=g),
    )


def gradients(runner, case, inputs, cots, upcast=False):
    """d(Σ tokens·c + Σ z_hat·c + Σ covariance·c)/d(every trainable input) via torch.autograd.grad (float64 leaves
    with `upcast`)."""
    names = leaves_of(case, inputs)
    inputs = float64(inputs) if upcast else dict(inputs)
    for name in names:
        inputs[name] = inputs[name].detach().clone().requires_grad_(True)
    out = runner(case, inputs)[0]
    loss = sum((getattr(out, k).double() * c.double()).sum() for k, c in cots.items())
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names]), strict=True))


def assert_close(actual, expected, rel, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.1g} x {scale:.3g}"


@pytest.fixture(params=BACKENDS)
def backend(request):
    with force_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients against the float64 oracle, both backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_outputs_and_gradients_match_reference(backend, case, dtype):
    inputs = make_inputs(case, dtype)
    out, running_mean, running_var = run_op(case, inputs)
    ref, ref_mean, ref_var = run_reference(case, inputs)
    rel = REL_TOL[dtype]
    assert out.tokens.dtype == dtype and out.target.dtype == dtype
    for name in OUTPUTS:
        assert_close(getattr(out, name), getattr(ref, name), rel, name)
    assert out.count.item() == case.B * case.side**2
    if case.normalize:
        assert_close(running_mean, ref_mean, rel, "running_mean")
        assert_close(running_var, ref_var, rel, "running_var")
        if not case.training:  # eval mode leaves the running statistics alone
            assert torch.equal(running_mean, inputs["running_mean"])
    assert not out.target.requires_grad and not out.batch_mean.requires_grad

    cots = cotangents(case)
    got = gradients(run_op, case, inputs, {k: c.to(dtype) for k, c in cots.items()})
    want = gradients(run_reference, case, inputs, cots, upcast=True)
    assert set(got) == set(want) and ("weight" in got) == case.learnable
    for name in got:
        assert got[name].dtype == dtype, name
        assert_close(got[name], want[name], rel, f"d{name}")


def test_non_square_image_grid(backend):
    """H != W (both multiples of the feature grid side and the patch): values and the projection's gradient."""
    g = torch.Generator().manual_seed(5)
    B, L, D, d, C, H, W, p, hidden = 2, 4, 12, 3, 2, 4, 6, 2, 16
    args = [torch.randn(*s, generator=g) for s in [(B, L, D), (D, d), (B, C, H, W), (B, C, H, W), (B, d, H, W)]]
    args += [torch.rand(B, generator=g), torch.randn(hidden, C + d, p, p, generator=g),
             torch.randn(hidden, generator=g), torch.randn(1, (H // p) * (W // p), hidden, generator=g)]  # fmt: skip
    leaf = args[1].clone().requires_grad_(True)
    out = joint_embedding(args[0], leaf, *args[2:])
    leaf64 = args[1].double().requires_grad_(True)
    ref = reference.joint_embedding_ref(args[0].double(), leaf64, *[a.double() for a in args[2:]])
    for name in ("tokens", "target", "z_hat"):
        assert_close(getattr(out, name), getattr(ref, name), 2e-5, name)
    cot = torch.randn(out.tokens.shape, generator=g)
    got = torch.autograd.grad(out.tokens, leaf, cot)[0]
    want = torch.autograd.grad(ref.tokens, leaf64, cot.double())[0]
    assert_close(got, want, 2e-5, "dweight")


def test_cumulative_running_average_matches_batchnorm_with_momentum_none(backend):
    """momentum=None: the running statistics are the plain average over the batches seen (nn.BatchNorm1d's rule)."""
    case = CASES[1]
    batchnorm = torch.nn.BatchNorm1d(case.d, momentum=None)
    running_mean, running_var = batchnorm.running_mean.clone(), batchnorm.running_var.clone()
    tracked = batchnorm.num_batches_tracked.clone()
    for seed in range(3):
        inputs = make_inputs(case, seed=seed)
        args = [inputs[k] for k in ("features", "weight", "x", "noise_x", "noise_z", "t", "patch_weight")]
        out = joint_embedding(*args, feature_mean=inputs["feature_mean"], feature_std=inputs["feature_std"],
                              running_mean=running_mean, running_var=running_var, num_batches_tracked=tracked,
                              momentum=None)  # fmt: skip
        batchnorm(out.projected.reshape(-1, case.d))
    assert tracked.item() == 3
    assert_close(running_mean, batchnorm.running_mean, 2e-5, "running_mean")
    assert_close(running_var, batchnorm.running_var, 2e-5, "running_var")


def test_reference_covariance_and_statistics_are_the_textbook_ones():
    """The oracle's statistics against direct float64 formulas (so the tests above compare with the right thing)."""
    case = CASES[0]
    inputs = float64(make_inputs(case))
    ref = run_reference(case, inputs)[0]
    p = ((inputs["features"] - inputs["feature_mean"]) / inputs["feature_std"]) @ inputs["weight"]
    p = p.reshape(-1, case.d)
    normalized = (p - p.mean(0)) / torch.sqrt(p.var(0, correction=0) + 1e-5) * inputs["norm_weight"]
    torch.testing.assert_close(ref.projected.reshape(-1, case.d), p)
    torch.testing.assert_close(ref.z_hat.reshape(-1, case.d), case.scale * (normalized + inputs["norm_bias"]))
    torch.testing.assert_close(ref.covariance, torch.cov(normalized.T))


def test_gradient_reaches_only_the_documented_inputs(backend):
    """features, x, noises and t get no gradient (frozen encoder, data, noise); the target is detached."""
    case = CASES[0]
    inputs = make_inputs(case)
    for name in ("features", "x", "noise_x", "noise_z", "t"):
        inputs[name] = inputs[name].clone().requires_grad_(True)
    inputs["weight"] = inputs["weight"].clone().requires_grad_(True)
    out = run_op(case, inputs)[0]
    assert not out.target.requires_grad
    grads = torch.autograd.grad(out.tokens.sum(), [inputs[n] for n in ("features", "x", "weight")], allow_unused=True)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    assert grads[1] is None or torch.count_nonzero(grads[1]) == 0
    assert torch.count_nonzero(grads[2]) > 0


def test_float64_runs_on_the_torch_backend_and_triton_refuses_it():
    case = CASES[0]
    inputs = float64(make_inputs(case))
    with force_backend("auto"):
        out = run_op(case, inputs)[0]
    assert_close(out.tokens, run_reference(case, inputs)[0].tokens, 1e-12, "tokens")
    with force_backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        run_op(case, inputs)


# ---------------------------------------------------------------------------------------------------------------
# Launchers with explicit tiles: several programs, tiles across samples, split row ranges
# ---------------------------------------------------------------------------------------------------------------


def test_projection_launcher_merges_partial_statistics():
    """Three programs of 16 rows (the last one partial): p and the merged Chan statistics equal the two-pass ones,
    also with |mean| ≫ std (a raw-feature offset that Σp² − N·mean² would lose in fp32)."""
    features = torch.randn(5, 8, 20) + 40.0  # M = 40 rows
    weight = torch.randn(20, 3)
    mean, std = torch.zeros(20), torch.ones(20) * 0.5
    projected, counts, sums, scatters = _kernels.project(features, weight, mean, std, block_m=16, block_k=16)
    assert counts.tolist() == [16.0, 16.0, 8.0]
    count, batch_mean, scatter = op.merge_statistics(counts, sums, scatters, sync=False)
    p64 = ((features.double() - mean.double()) / std.double()).reshape(-1, 20) @ weight.double()
    assert_close(projected, p64, 1e-6, "projected")
    assert count.item() == 40
    assert_close(batch_mean, p64.mean(0), 1e-6, "mean")
    centered = p64 - p64.mean(0)
    torch.testing.assert_close(scatter.double(), centered.T @ centered, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("block_t", [16, 4])
def test_embedding_launchers_with_tiles_across_samples(block_t):
    """T = 9 tokens per sample with 16- or 4-token tiles: tiles start mid-sample; every value still lands right."""
    case = Case("tiles", B=3, C=4, H=6, d=3)
    inputs = make_inputs(case)
    ref = run_reference(case, inputs)[0]
    p, counts, sums, scatters = reference.project_torch(
        inputs["features"], inputs["weight"], inputs["feature_mean"], inputs["feature_std"], torch.float32
    )
    count, mean, scatter = op.merge_statistics(counts, sums, scatters, sync=False)
    constants = op.norm_constants(mean, torch.diagonal(scatter) / count, None, None, None, None, True, True, 1e-5,
                                  case.scale)  # fmt: skip
    tokens, target, patches = _kernels.embed(
        p, constants.mean, constants.scale, constants.shift, inputs["x"], inputs["noise_x"], inputs["noise_z"],
        inputs["t"], None, inputs["patch_weight"], inputs["patch_bias"], inputs["pos_embed"], torch.float32,
        block_t=block_t, block_h=16,
    )  # fmt: skip
    assert_close(tokens, ref.tokens, 2e-5, "tokens")
    assert_close(target, ref.target, 2e-5, "target")
    assert patches[:, -1].eq(1).all()

    dtokens, dz_hat_in = torch.randn_like(tokens), torch.randn(case.B * 4, case.d)
    args = (dtokens, dz_hat_in, p, constants.mean, constants.rstd, inputs["t"], None, inputs["patch_weight"], case.C,
            case.H, case.H)  # fmt: skip
    dzhat, parts = _kernels.embed_bwd(*args, block_t=block_t, block_h=16, block_r=4)
    want_dzhat, want_sums = reference.embed_bwd_torch(*args)
    assert parts.shape[0] == 3  # 12 token-grid cells in programs of 4
    assert_close(dzhat, want_dzhat, 2e-5, "dzhat")
    assert_close(parts.sum(0), want_sums[0], 2e-5, "sums")


def test_weight_gradient_launcher_splits_rows_and_columns():
    """Column blocks of 16 (D = 20: the second partial) × row ranges of 16 (M = 40: the last partial)."""
    M, D, d = 40, 20, 3
    features = torch.randn(M, D) * 2 + 1
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    dz_hat, projected = torch.randn(M, d), torch.randn(M, d)
    center, alpha, offset, mix = torch.randn(d), torch.randn(d), torch.randn(d), torch.randn(d, d)
    got = _kernels.project_bwd(features, mean, std, dz_hat, projected, center, alpha, offset, mix, block_m=16,
                               block_k=16, rows_per_program=16)  # fmt: skip
    want = reference.project_bwd_torch(features.double(), mean.double(), std.double(), dz_hat.double(),
                                       projected.double(), center.double(), alpha.double(), offset.double(),
                                       mix.double())  # fmt: skip
    assert_close(got, want, 1e-6, "dW")
    with pytest.raises(ValueError, match="rows_per_program"):
        _kernels.project_bwd(features, mean, std, dz_hat, projected, center, alpha, offset, mix, block_m=16,
                             rows_per_program=24)  # fmt: skip


def test_resize_matrix_equals_f_interpolate():
    for side, size in [(2, 4), (2, 6), (4, 4), (3, 12), (16, 32)]:
        grid = torch.randn(2, 3, side, side, dtype=torch.float64)
        R = reference.resize_matrix(side, size, torch.float64, "cpu")
        expected = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(torch.einsum("hy,bcyx,wx->bchw", R, grid, R), expected)


# ---------------------------------------------------------------------------------------------------------------
# Two ranks: the statistics and gradients of the global batch
# ---------------------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_slice(inputs, rank, half):
    sliced = {}
    for key, value in inputs.items():
        per_sample = key in ("features", "x", "noise_x", "noise_z", "t", "feature_keep")
        sliced[key] = value[rank * half : (rank + 1) * half] if per_sample and value is not None else value
    return sliced


def _distributed_worker(rank, port, case, inputs, cots, backend_name, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = case.B // 2
        local = _rank_slice(inputs, rank, half)
        local_cots = {k: (v[rank * half : (rank + 1) * half] if k != "covariance" else v / 2) for k, v in cots.items()}
        with force_backend(backend_name):
            names = leaves_of(case, local)
            for name in names:
                local[name] = local[name].detach().clone().requires_grad_(True)
            out, running_mean, running_var = run_op(case, local, sync_stats=None)  # automatic: 2 ranks
            loss = sum((getattr(out, k) * c).sum() for k, c in local_cots.items())
            grads = torch.autograd.grad(loss, [local[n] for n in names])
        # numpy copies: tensors sent through the queue would share memory with this exiting process.
        outputs = {k: getattr(out, k).detach().numpy().copy() for k in OUTPUTS + ("count",)}
        queue.put((rank, outputs, running_mean.numpy().copy(), running_var.numpy().copy(),
                   {n: g.numpy().copy() for n, g in zip(names, grads, strict=True)}))  # fmt: skip
        dist.barrier()  # both ranks done before either tears gloo down (see tests/test_cross_rank.py)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_two_ranks_match_one_process_on_the_concatenated_batch(backend_name):
    """Each rank embeds half the batch; statistics, running statistics, outputs and the sum of the ranks' gradients
    (what data parallelism applies) equal one process on the whole batch."""
    case = Case("dist", B=4, keep=True, affine=True, scale=1.3)
    inputs = make_inputs(case)
    cots = cotangents(case)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_distributed_worker, args=(r, port, case, inputs, cots, backend_name, queue))
             for r in range(2)]  # fmt: skip
    for proc in procs:
        proc.start()
    results = {}
    for rank, outputs, r_mean, r_var, grads in (queue.get(timeout=120) for _ in procs):
        as_tensors = {k: torch.from_numpy(v) for k, v in outputs.items()}
        results[rank] = (as_tensors, torch.from_numpy(r_mean), torch.from_numpy(r_var),
                         {k: torch.from_numpy(v) for k, v in grads.items()})  # fmt: skip
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    with force_backend(backend_name):
        whole, running_mean, running_var = run_op(case, inputs)
        grads = gradients(run_op, case, inputs, cots)
    for name in ("tokens", "target", "z_hat", "projected"):
        assert_close(torch.cat([results[0][0][name], results[1][0][name]]), getattr(whole, name), 2e-5, name)
    for rank in (0, 1):
        outputs, r_mean, r_var, _ = results[rank]
        for name in ("batch_mean", "batch_var", "covariance", "count"):
            assert_close(outputs[name], getattr(whole, name), 2e-5, f"rank {rank} {name}")
        assert_close(r_mean, running_mean, 2e-5, "running_mean")
        assert_close(r_var, running_var, 2e-5, "running_var")
    for name, value in grads.items():
        assert_close(results[0][3][name] + results[1][3][name], value, 2e-5, f"d{name}")


# ---------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, module == functional, dispatch, errors
# ---------------------------------------------------------------------------------------------------------------


def _fwd_args(case, inputs):
    batch_stats = case.training or not case.normalize
    return (
        inputs["features"], inputs["weight"], inputs["feature_mean"], inputs["feature_std"], inputs["x"],
        inputs["noise_x"], inputs["noise_z"], inputs["t"], inputs["feature_keep"], inputs["patch_weight"],
        inputs["patch_bias"], inputs["pos_embed"], inputs.get("norm_weight"), inputs.get("norm_bias"),
        inputs.get("running_mean"), inputs.get("running_var"), case.normalize, batch_stats, 1e-5, case.scale, False,
        inputs["patch_weight"].dtype,
    )  # fmt: skip


def test_opcheck(backend):
    case = CASES[0]
    inputs = make_inputs(case)
    for name in leaves_of(case, inputs):
        inputs[name] = inputs[name].clone().requires_grad_(True)
    args = _fwd_args(case, inputs)
    torch.library.opcheck(torch.ops.coredi.joint_embedding_fwd.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.ops.coredi.joint_embedding_fwd(*detached)
    tokens, _, z_hat, scatter, mean, var, count, projected, patches = out
    f, _, fm, fs, _, _, _, t, keep, pw, _, _, nw, _, _, _ = detached[:16]
    bwd_args = (torch.randn_like(tokens), torch.randn_like(z_hat), torch.randn_like(scatter), f, fm, fs, t, keep, pw,
                nw, None, None, projected, patches, mean, var, count, True, True, 1e-5, case.scale, False, case.H,
                case.H, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.coredi.joint_embedding_bwd.default, bwd_args)
    no_dz = bwd_args[:1] + (None, None) + bwd_args[3:]
    torch.library.opcheck(torch.ops.coredi.joint_embedding_bwd.default, no_dz)


def test_torch_compile_fullgraph_matches_eager():
    """A compiled training-step fragment (op, running update, covariance, a loss): same values, gradients and
    running statistics as eager (CPU: the torch backend)."""
    case = CASES[0]
    inputs = make_inputs(case)

    def step(weight, patch_weight, running_mean, running_var):
        out = joint_embedding(
            inputs["features"], weight, inputs["x"], inputs["noise_x"], inputs["noise_z"], inputs["t"], patch_weight,
            inputs["patch_bias"], inputs["pos_embed"], feature_keep=inputs["feature_keep"],
            feature_mean=inputs["feature_mean"], feature_std=inputs["feature_std"], norm_weight=inputs["norm_weight"],
            norm_bias=inputs["norm_bias"], running_mean=running_mean, running_var=running_var, momentum=0.3,
            feature_scale=case.scale,
        )  # fmt: skip
        return out.tokens.square().mean() + out.covariance.square().sum() + out.z_hat.sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def run(fn):
        w = inputs["weight"].clone().requires_grad_(True)
        pw = inputs["patch_weight"].clone().requires_grad_(True)
        rm, rv = inputs["running_mean"].clone(), inputs["running_var"].clone()
        loss = fn(w, pw, rm, rv)
        return [loss, *torch.autograd.grad(loss, [w, pw]), rm, rv]

    with force_backend("torch"):
        eager, comp = run(step), run(compiled)
    for got, want in zip(comp, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_module_equals_functional_and_follows_train_eval():
    case = Case("module", affine=True, scale=1.3)
    inputs = make_inputs(case)
    module = JointEmbedding(case.D, case.d, affine=True, momentum=0.3, feature_scale=1.3)
    conv = torch.nn.Conv2d(case.C + case.d, case.hidden, case.p, stride=case.p)
    with torch.no_grad():
        module.weight.copy_(inputs["weight"])
        module.norm.weight.copy_(inputs["norm_weight"])
        module.norm.bias.copy_(inputs["norm_bias"])
        module.feature_mean.copy_(inputs["feature_mean"])
        module.feature_std.copy_(inputs["feature_std"])
        conv.weight.copy_(inputs["patch_weight"])
        conv.bias.copy_(inputs["patch_bias"])
    assert set(module.state_dict()) == {"weight", "feature_mean", "feature_std", "norm.weight", "norm.bias",
                                        "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    data = [inputs[k] for k in ("features", "x", "noise_x", "noise_z", "t")]
    for mode in ("train", "eval"):
        getattr(module, mode)()
        case_mode = replace(case, training=mode == "train")
        reference_inputs = dict(inputs, running_mean=module.norm.running_mean.clone(),
                                running_var=module.norm.running_var.clone())  # fmt: skip
        ref, ref_mean, ref_var = run_reference(case_mode, reference_inputs)
        out = module(*data, conv, inputs["pos_embed"])
        for name in OUTPUTS:
            assert_close(getattr(out, name), getattr(ref, name), 2e-5, f"{mode} {name}")
        assert_close(module.norm.running_mean, ref_mean, 2e-5, f"{mode} running_mean")
        assert_close(module.norm.running_var, ref_var, 2e-5, f"{mode} running_var")
    assert module.norm.num_batches_tracked.item() == 1


def test_auto_backend_is_torch_on_cpu_and_triton_runs_the_kernels(monkeypatch):
    calls = []
    launcher = _kernels.project
    monkeypatch.setattr(_kernels, "project", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    case = CASES[0]
    inputs = make_inputs(case)
    with force_backend("auto"):
        auto = run_op(case, inputs)[0]
    assert calls == []
    with force_backend("triton"):
        fused = run_op(case, inputs)[0]
    assert calls == [1]
    assert_close(fused.tokens, auto.tokens, 2e-5, "tokens")


def test_bad_inputs_raise_errors_naming_the_argument():
    case = CASES[0]
    good = make_inputs(case)

    def run(**changes):
        return run_op(case, dict(good, **changes))

    cases = [
        (dict(features=good["features"][0]), ValueError, "features must have shape"),
        (dict(features=torch.randn(3, 5, 20)), ValueError, "not a square grid"),
        (dict(weight=torch.randn(19, 3)), ValueError, "weight must have shape"),
        (dict(feature_std=torch.ones(7)), ValueError, "feature_std must have shape"),
        (dict(x=torch.randn(2, 1, 4, 4)), ValueError, "x must have shape"),
        (dict(noise_x=torch.randn(3, 1, 4, 5)), ValueError, "noise_x must have shape"),
        (dict(noise_z=torch.randn(3, 2, 4, 4)), ValueError, "noise_z must have shape"),
        (dict(t=torch.rand(2)), ValueError, "t must have shape"),
        (dict(t=torch.ones(3, dtype=torch.long)), TypeError, "t must be a floating-point"),
        (dict(feature_keep=torch.ones(2, dtype=torch.bool)), ValueError, "feature_keep must be"),
        (dict(patch_weight=torch.randn(24, 5, 2, 2)), ValueError, "patch_weight must have shape"),
        (dict(patch_bias=torch.randn(23)), ValueError, "patch_bias must have shape"),
        (dict(pos_embed=torch.randn(1, 5, 24)), ValueError, "pos_embed must have shape"),
        (dict(x=torch.randn(3, 1, 5, 5), noise_x=torch.randn(3, 1, 5, 5), noise_z=torch.randn(3, 3, 5, 5)),
         ValueError, "patch size"),  # fmt: skip
        (dict(running_var=None), ValueError, "running_mean and running_var"),
        (dict(norm_weight=torch.ones(4)), ValueError, "norm_weight must have shape"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            run(**changes)
    x6 = dict(x=torch.randn(3, 1, 6, 6), noise_x=torch.randn(3, 1, 6, 6), noise_z=torch.randn(3, 3, 6, 6),
              patch_weight=torch.randn(24, 4, 3, 3), pos_embed=torch.randn(1, 4, 24))  # fmt: skip
    with pytest.raises(ValueError, match="integer multiple of the feature grid side"):
        run_op(case, dict(good, features=torch.randn(3, 16, 20), **x6))
    with pytest.raises(ValueError, match="eps must be > 0"):
        run_op(case, good, eps=0.0)
    with pytest.raises(ValueError, match="feature_scale"):
        call(joint_embedding, replace(case, scale=-1.0), good)
    with pytest.raises(ValueError, match="momentum"):
        call(joint_embedding, case, good, momentum=2.0)
    with pytest.raises(TypeError, match="patch_embed"):
        JointEmbedding(20, 3)(*[good[k] for k in ("features", "x", "noise_x", "noise_z", "t")], torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="patchify Conv2d"):
        JointEmbedding(20, 3)(*[good[k] for k in ("features", "x", "noise_x", "noise_z", "t")],
                              torch.nn.Conv2d(4, 24, 2, stride=1))  # fmt: skip
    with pytest.raises(ValueError, match="dim=30"):
        JointEmbedding(20, 30)


def test_public_api_is_exported():
    import importlib

    package = importlib.import_module("coredi_kernels.joint_embedding")  # the attribute is the function
    assert set(package.__all__) == {"JointEmbedding", "JointEmbeddingOutput", "joint_embedding"}
    assert coredi_kernels.joint_embedding is package.joint_embedding
    assert hasattr(torch.ops.coredi, "joint_embedding_fwd") and hasattr(torch.ops.coredi, "joint_embedding_bwd")
    assert coredi_kernels.force_backend is force_backend


# ---------------------------------------------------------------------------------------------------------------
# bf16: the two-reference error budget (tiny on the CPU interpreter, real shapes on a GPU)
# ---------------------------------------------------------------------------------------------------------------


def check_bf16_error_budget(case, device):
    """Our bf16 error against an fp32 evaluation must be <= 2x PyTorch's own bf16 error (the unfused path on the
    same bf16 inputs), plus a small atol."""
    inputs = make_inputs(case, torch.bfloat16, device=device)
    inputs["weight"] = inputs["weight"].float()  # the projection is an fp32 parameter, as in training
    fp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    cots = {k: v.to(device) for k, v in cotangents(case).items()}

    def reference_runner(c, i):
        return call(reference.joint_embedding_ref, c, i, momentum=0.3)

    ref_out = reference_runner(case, fp32)[0]
    ref_grads = gradients(reference_runner, case, fp32, cots)
    torch_out = reference_runner(case, inputs)[0]
    torch_grads = gradients(reference_runner, case, inputs, {k: v.bfloat16() for k, v in cots.items()})
    ours_out = run_op(case, inputs)[0]
    ours_grads = gradients(run_op, case, inputs, {k: v.bfloat16() for k, v in cots.items()})

    def check(name, ours, theirs, ref):
        ours_err = (ours.float() - ref.float()).abs().max().item()
        torch_err = (theirs.float() - ref.float()).abs().max().item()
        atol = 1e-2 * max(1.0, ref.abs().max().item())
        assert ours_err <= 2 * torch_err + atol, f"{name}: ours {ours_err:.3g} vs torch {torch_err:.3g} (+{atol:.3g})"

    for name in ("tokens", "target", "z_hat", "covariance"):
        check(name, getattr(ours_out, name), getattr(torch_out, name), getattr(ref_out, name))
    for name in ours_grads:
        check(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name])


def test_bf16_error_budget_interpreter():
    with force_backend("triton"):
        check_bf16_error_budget(Case("bf16", B=2, d=8, C=4, affine=True, keep=True), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

SIT_XL_SMALL_BATCH = Case("sit-xl-b8", B=8, side=16, D=768, d=8, C=4, H=32, p=2, hidden=1152, keep=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [SIT_XL_SMALL_BATCH, replace(SIT_XL_SMALL_BATCH, name="affine-eval", B=3,
                                                               affine=True, training=False)], ids=lambda c: c.name)
def test_gpu_bf16_error_budget(case):
    check_bf16_error_budget(case, "cuda")


@pytest.fixture
def no_tf32():
    """TF32 off for matmuls and convolutions (torch's flags, which the kernels follow), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
def test_gpu_fp32_matches_reference_with_default_tiles(no_tf32):
    """fp32 on the GPU with TF32 off (the kernels then use 3xTF32 dots): every output and gradient vs float64."""
    case = replace(SIT_XL_SMALL_BATCH, B=5, affine=True)  # 5·256 tokens: tiles cross samples
    inputs = make_inputs(case, device="cuda")
    out = run_op(case, inputs)[0]
    ref = run_reference(case, inputs)[0]
    for name in OUTPUTS:
        assert_close(getattr(out, name), getattr(ref, name), 1e-4, name)
    cots = {k: v.cuda() for k, v in cotangents(case).items()}
    got = gradients(run_op, case, inputs, cots)
    want = gradients(run_reference, case, inputs, cots, upcast=True)
    for name in got:
        assert_close(got[name], want[name], 1e-4, f"d{name}")


@pytest.mark.gpu
def test_gpu_forward_and_backward_are_deterministic():
    case = replace(SIT_XL_SMALL_BATCH, B=32)
    inputs = make_inputs(case, torch.bfloat16, device="cuda")
    inputs["weight"] = inputs["weight"].float()
    cots = {k: v.cuda().bfloat16() for k, v in cotangents(case).items()}
    first = gradients(run_op, case, inputs, cots)
    second = gradients(run_op, case, inputs, cots)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    case = replace(SIT_XL_SMALL_BATCH, B=2)
    inputs = make_inputs(case, torch.bfloat16, device="cuda")
    inputs["weight"] = inputs["weight"].float().requires_grad_(True)
    torch.library.opcheck(torch.ops.coredi.joint_embedding_fwd.default, _fwd_args(case, inputs))

    def fragment(weight):
        out = joint_embedding(inputs["features"], weight, inputs["x"], inputs["noise_x"], inputs["noise_z"],
                              inputs["t"], inputs["patch_weight"], inputs["patch_bias"], inputs["pos_embed"],
                              feature_keep=inputs["feature_keep"])  # fmt: skip
        return out.tokens.float().square().mean()

    eager = fragment(inputs["weight"])
    compiled = torch.compile(fragment, fullgraph=True)(inputs["weight"])
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
