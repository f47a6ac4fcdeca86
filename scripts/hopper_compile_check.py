"""Compile every Triton kernel of coredi_kernels for Hopper (sm_90a) on a CPU-only machine; report registers,
spills and shared memory; fail on any compile error or spill.

Why: the tests run the kernels in Triton's CPU interpreter, which hides everything about the real compilation: a
kernel can pass every interpreter test and still fail to compile for sm_90a, spill registers to local memory, or
ask for more shared memory than an H100 has. GPU time is rare, so this check catches those on CPU.

How (`_hopper_target.py` holds the Triton-internals half):
  1. A stand-in Triton driver reports an sm_90 CUDA target; Triton's real CudaDriver (which needs libcuda) is never
     created. A fresh TRITON_CACHE_DIR per run makes every compile real (and its time honest).
  2. Each case calls the ops' real Python launchers (`coredi_kernels.*._kernels`) on CPU tensors of the real shapes,
     so constexprs, tiles, num_warps and integer specializations are exactly the ones a real launch uses. Every
     `kernel[grid](...)` is turned into `warmup=True`: Triton compiles it (its bundled ptxas, sm_90a) and returns
     without launching.
  3. Launch heuristics that read the device are made to see an H100 during the cases (reported in the output):
     `num_sms` -> 132 SMs and each op's `backward_rows_per_program` is given a CUDA device (programs per backward
     as on an H100), and `Tensor.is_cuda` reads True (the joint embedding's launchers pick their GPU tiles with it;
     on CPU they pick interpreter tiles).
  4. Registers and spill bytes come from the `ptxas -v` log of the compile that built each cubin; shared memory,
     num_warps and num_stages from the kernel's metadata. Identical specializations (e.g. RMSNorm at D=1152 and
     D=1280 share one) compile once; later rows say `cached`.

    python scripts/hopper_compile_check.py [--triton-path FOLDER] [--json OUT.json] [--arch 90] [--cases all|PATTERNS]

--triton-path puts FOLDER first on sys.path (e.g. build/triton36 from `pip install --target build/triton36
triton==3.6.0`), so the check runs with that Triton and the installed torch. --cases takes comma-separated fnmatch
patterns over case ids (e.g. 'qk_norm_rope/*,*/bfloat16'), 'all' or 'none'; --list shows the ids. --extra-cases
FILE adds the cases of a Python file defining CASES = [dict(id=, op=, shape=, dtype=, kernels=[names], run=fn)].
Exit status: 0 all compiled without spills, 1 a kernel failed (compile error, spill, too much shared memory, an
expected kernel never launched, a launcher raised), 2 the check could not run (e.g. an unknown Triton release).
"""
import argparse
import contextlib
import fnmatch
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _hopper_target as target

B_SIT, T_TOKENS = 128, 256  # batch and tokens of the norm / qk-norm cases
NORM_MODELS = {"sit-xl2": 1152, "jit-b16": 768, "jit-h16": 1280}  # model -> width D
QK_MODELS = {"jit-b16": (12, 64), "jit-h16": (16, 80)}  # model -> (heads, head dim)
QK_LAYERNORM_HEADS = (16, 72)  # LightningDiT-XL / REPA SiT-XL --qk-norm: LayerNorm qk-norm (+ RoPE in LightningDiT)
# SiT-XL/2 CoReDi joint embedding: batch, DINOv2 tokens (16x16) x 768, d, VAE latent channels x 32 x 32, patch, hidden.
JOINT = dict(B=256, L=256, D=768, d=8, C=4, H=32, p=2, hidden=1152)
NORM_KERNELS = ["_norm_modulate_fwd_kernel", "_norm_modulate_bwd_kernel"]
QK_KERNELS = ["_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"]
JOINT_KERNELS = ["_project_fwd_kernel", "_embed_inputs_kernel", "_patch_gemm_kernel", "_embed_bwd_kernel",
                 "_resize_adjoint_kernel", "_project_bwd_kernel"]


@dataclass
class Case:
    id: str
    op: str
    shape: str
    dtype: str
    kernels: list  # the kernels its launchers must compile
    run: Callable[[], None]


@dataclass
class Row:
    """One compiled kernel launch of one case (JSON row)."""

    case: str
    op: str
    shape: str
    dtype: str
    kernel: str
    grid: list
    constexprs: dict
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack_frame: int = -1
    shared: int = -1
    num_warps: int = -1
    num_stages: int = -1
    compile_s: float = 0.0
    cached: bool = False  # the same specialization was compiled earlier in this run (numbers are that compile's)
    hash: str = ""
    problems: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Cases: the real launchers at the real shapes
# ---------------------------------------------------------------------------------------------------------------


def norm_modulate_case(op: str, model: str, dtype_name: str) -> Case:
    """LayerNorm/RMSNorm + modulate (+ gated residual): the forward launcher, then the backward on its outputs."""
    import torch
    from coredi_kernels.norm_modulate import _kernels as nm

    D, dtype = NORM_MODELS[model], getattr(torch, dtype_name)
    rms, gated = op.endswith("rmsnorm_modulate"), op.startswith("gated_residual")

    def run():
        x = torch.empty(B_SIT, T_TOKENS, D, dtype=dtype)
        y, dout, dh_in = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        gate, shift, scale = torch.empty(B_SIT, 6 * D, dtype=dtype).chunk(6, dim=1)[:3]  # adaLN chunk views
        weight = torch.empty(D) if rms else None  # JiT's RMSNorm weight: an fp32 parameter
        eps = 1e-6
        if rms and gated:
            h, _, rstd = nm.gated_residual_rmsnorm_modulate_fwd(x, y, gate, weight, shift, scale, eps)
            nm.gated_residual_rmsnorm_modulate_bwd(dout, dh_in, h, y, gate, weight, scale, rstd)
        elif rms:
            _, rstd = nm.rmsnorm_modulate_fwd(x, weight, shift, scale, eps)
            nm.rmsnorm_modulate_bwd(dout, x, weight, scale, rstd)
        elif gated:
            h, _, mean, rstd = nm.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps)
            nm.gated_residual_layernorm_modulate_bwd(dout, dh_in, h, y, gate, scale, mean, rstd)
        else:
            _, mean, rstd = nm.layernorm_modulate_fwd(x, shift, scale, eps)
            nm.layernorm_modulate_bwd(dout, x, scale, mean, rstd)

    return Case(f"{op}/{model}/{dtype_name}", op, f"x ({B_SIT}, {T_TOKENS}, {D})", dtype_name, NORM_KERNELS, run)


def qk_norm_rope_case(model: str, dtype_name: str) -> Case:
    """JiT's qk-norm + RoPE: forward on the packed qkv, backward from gradients in the forward's output layout."""
    import torch
    from coredi_kernels.qk_norm_rope import _kernels as qk

    H, Dh = QK_MODELS[model]
    dtype = getattr(torch, dtype_name)

    def run():
        qkv = torch.empty(B_SIT, T_TOKENS, 3, H, Dh, dtype=dtype)
        q_weight, k_weight = torch.empty(Dh), torch.empty(Dh)  # fp32 parameters
        cos, sin = torch.empty(T_TOKENS, Dh // 2), torch.empty(T_TOKENS, Dh // 2)  # fp32 buffers
        q, k, v = qk.qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, 1e-6)
        qk.qk_norm_rope_bwd(q, k, v, qkv, q_weight, k_weight, cos, sin, 1e-6)

    shape = f"qkv ({B_SIT}, {T_TOKENS}, 3, {H}, {Dh})"
    return Case(f"qk_norm_rope/{model}/{dtype_name}", "qk_norm_rope", shape, dtype_name, QK_KERNELS, run)


def qk_layernorm_rope_case(dtype_name: str) -> Case:
    """The LayerNorm form (weight and bias per head channel, IS_LAYER_NORM) at LightningDiT-XL/REPA SiT-XL's heads
    (16 x 72) with RoPE: the same two kernels, another specialization with its own tiles."""
    import torch
    from coredi_kernels.qk_norm_rope import _kernels as qk

    H, Dh = QK_LAYERNORM_HEADS
    dtype = getattr(torch, dtype_name)

    def run():
        qkv = torch.empty(B_SIT, T_TOKENS, 3, H, Dh, dtype=dtype)
        weights = [torch.empty(Dh) for _ in range(4)]  # q weight, q bias, k weight, k bias: fp32 parameters
        cos, sin = torch.empty(T_TOKENS, Dh // 2), torch.empty(T_TOKENS, Dh // 2)
        q, k, v = qk.qk_norm_rope_fwd(qkv, weights[0], weights[2], cos, sin, 1e-6, q_bias=weights[1],
                                      k_bias=weights[3], layer_norm=True)
        qk.qk_layernorm_rope_bwd(q, k, v, qkv, *weights, cos, sin, 1e-6)

    shape = f"qkv ({B_SIT}, {T_TOKENS}, 3, {H}, {Dh})"
    return Case(f"qk_layernorm_rope/sit-xl2/{dtype_name}", "qk_layernorm_rope", shape, dtype_name, QK_KERNELS, run)


def joint_embedding_case(dtype_name: str, feature_dropout: bool = False, allow_tf32: bool = False) -> Case:
    """The CoReDi joint embedding's four launchers (project, embed, embed_bwd, project_bwd), in the order and with
    the tl.dot precisions the op uses: torch's default TF32 flags (matmul off: 'tf32x3'; cuDNN on: 'tf32'), no
    dẑ gradient from outside. The variant (`feature_dropout`, `allow_tf32`) adds the feature keep mask
    (Representation Guidance training) and TF32 matmuls ('tf32' projections), the other specializations training
    can reach."""
    import torch
    from coredi_kernels.joint_embedding import _kernels as je
    from coredi_kernels.joint_embedding.op import _precision

    s, dtype = JOINT, getattr(torch, dtype_name)
    B, L, D, d, C, H, p, hidden = (s[k] for k in ("B", "L", "D", "d", "C", "H", "p", "hidden"))
    cuda = torch.device("cuda")

    def run():
        matmul = _precision(cuda, allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        conv = _precision(cuda, allow_tf32 or torch.backends.cudnn.allow_tf32)
        features = torch.empty(B, L, D, dtype=dtype)
        weight, feature_mean, feature_std = torch.empty(D, d), torch.empty(D), torch.ones(D)
        projected, *_ = je.project(features, weight, feature_mean, feature_std, precision=matmul)
        stats = [torch.empty(d) for _ in range(4)]  # norm mean, scale, shift, rstd (fp32, from the merged stats)
        x, noise_x, noise_z = (torch.empty(B, c, H, H, dtype=dtype) for c in (C, C, d))
        t, keep = torch.empty(B), torch.empty(B) if feature_dropout else None
        patch_weight, patch_bias = torch.empty(hidden, C + d, p, p, dtype=dtype), torch.empty(hidden, dtype=dtype)
        pos_embed = torch.empty(1, (H // p) ** 2, hidden, dtype=dtype)
        tokens, _, _ = je.embed(projected, *stats[:3], x, noise_x, noise_z, t, keep, patch_weight, patch_bias,
                                pos_embed, dtype, precision=conv)
        dzhat, _ = je.embed_bwd(torch.empty_like(tokens), None, projected, stats[0], stats[3], t, keep, patch_weight,
                                C, H, H, precision=conv)
        je.project_bwd(features, feature_mean, feature_std, dzhat, projected, *stats[:3], torch.empty(d, d),
                       precision=matmul)

    shape = f"f ({B}, {L}, {D}), d {d}, x ({B}, {C}, {H}, {H}), p {p}, hidden {hidden}"
    variant = "+keep" * feature_dropout + "+tf32" * allow_tf32
    return Case(f"joint_embedding/sit-xl2/{dtype_name}{variant}", "joint_embedding", shape, dtype_name, JOINT_KERNELS,
                run)


def all_cases() -> list:
    cases = []
    for dtype in ("float32", "bfloat16"):
        for op in ("layernorm_modulate", "gated_residual_layernorm_modulate"):
            cases.append(norm_modulate_case(op, "sit-xl2", dtype))
        for model in NORM_MODELS:
            for op in ("rmsnorm_modulate", "gated_residual_rmsnorm_modulate"):
                cases.append(norm_modulate_case(op, model, dtype))
        cases += [qk_norm_rope_case(model, dtype) for model in QK_MODELS]
        cases.append(qk_layernorm_rope_case(dtype))
        cases.append(joint_embedding_case(dtype))
    cases.append(joint_embedding_case("bfloat16", feature_dropout=True, allow_tf32=True))
    return cases


def extra_cases(path: str) -> list:
    """Cases from a Python file defining CASES (see the module docstring)."""
    spec = importlib.util.spec_from_file_location("hopper_extra_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [Case(c["id"], c.get("op", "extra"), c.get("shape", ""), c.get("dtype", ""), list(c["kernels"]), c["run"])
            for c in module.CASES]


def select_cases(cases: list, patterns: str) -> list:
    if patterns == "all":
        return cases
    if patterns == "none":
        return []
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.id, p) for p in wanted)]
    if not chosen:
        raise ValueError(f"--cases {patterns!r} matches no case; ids: " + ", ".join(c.id for c in cases))
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# What the launchers see: an H100
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def h100_launch_heuristics(sm_count: int = target.H100_SM_COUNT):
    """Inside the block: 132 SMs, each op's `backward_rows_per_program` computed for a CUDA device, and
    `Tensor.is_cuda` True (so launchers take their GPU tiles). The tensors themselves stay on the CPU."""
    import torch
    from coredi_kernels import _utils
    from coredi_kernels.joint_embedding import _kernels as je
    from coredi_kernels.norm_modulate import _kernels as nm
    from coredi_kernels.qk_norm_rope import _kernels as qk

    cuda = torch.device("cuda", 0)

    def on_cuda(helper):
        def wrapper(*args, **kwargs):  # the device is each helper's last argument
            if "device" in kwargs:
                kwargs["device"] = cuda
            else:
                args = (*args[:-1], cuda)
            return helper(*args, **kwargs)

        return wrapper

    patches = [(module, "backward_rows_per_program", on_cuda(module.backward_rows_per_program))
               for module in (nm, qk, je)]
    patches += [(module, "num_sms", lambda device: sm_count) for module in (_utils, je)]
    patches += [(torch.Tensor, "is_cuda", property(lambda self: True))]
    absent = object()  # Tensor.is_cuda lives on torch._C.TensorBase: the patch shadows it, undoing deletes it
    saved = [(obj, name, obj.__dict__.get(name, absent)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            if value is absent:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------


def row_from_launch(case: Case, launch, earlier: dict) -> Row:
    """A Row for one launch; `earlier` maps a compiled kernel's hash to the Row of its first compilation."""
    row = Row(case.id, case.op, case.shape, case.dtype, launch.kernel_name, list(launch.grid), launch.constexprs)
    if launch.error is not None:
        row.problems.append(f"compile error: {launch.error}")
        return row
    kernel = launch.compiled
    meta = kernel.metadata
    row.hash, row.shared, row.num_warps, row.num_stages = kernel.hash, meta.shared, meta.num_warps, meta.num_stages
    if launch.compilation is None:  # compiled earlier in this run: same cubin, same resources
        first = earlier.get(kernel.hash)
        row.cached = True
        if first is not None:
            row.registers, row.stack_frame = first.registers, first.stack_frame
            row.spill_stores, row.spill_loads = first.spill_stores, first.spill_loads
        else:
            row.problems.append("no ptxas log: the kernel came from a cache this check did not fill")
        return row
    row.compile_s = round(launch.compilation.seconds, 3)
    resources = target.parse_ptxas_log(launch.compilation.ptxas_log, meta.name)
    if resources is None:
        row.problems.append(f"no ptxas resource lines for {meta.name} in the log:\n{launch.compilation.ptxas_log}")
    else:
        row.registers, row.stack_frame = resources.registers, resources.stack_frame
        row.spill_stores, row.spill_loads = resources.spill_stores, resources.spill_loads
    if row.spill_stores or row.spill_loads:
        row.problems.append(f"register spills: {row.spill_stores} bytes stored, {row.spill_loads} bytes loaded")
    if not 0 < row.registers <= target.MAX_REGISTERS and resources is not None:
        row.problems.append(f"{row.registers} registers per thread")
    if row.shared > target.H100_MAX_SHARED_BYTES:
        row.problems.append(f"{row.shared} bytes of shared memory > an H100's {target.H100_MAX_SHARED_BYTES}")
    earlier.setdefault(kernel.hash, row)
    return row


def summary(problem: str, limit: int = 300) -> str:
    """A multi-line message (e.g. a CompilationError: location, source, caret, message) on one line."""
    lines = [line.strip() for line in problem.splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def progress_line(index: int, row: Row) -> str:
    head = f"[{index:3d}] {row.kernel:<26} {row.case:<48}"
    if row.hash == "":
        return f"{head} FAILED: {summary(row.problems[0])}"
    how = "cached" if row.cached else f"{row.compile_s:6.2f} s"
    status = "  !! " + "; ".join(summary(p) for p in row.problems) if row.problems else ""
    return (f"{head} regs {row.registers:3d}  spill {row.spill_stores}/{row.spill_loads}  smem {row.shared:6d}  "
            f"warps {row.num_warps:2d}  stages {row.num_stages}  {how}{status}")


def print_table(rows: list) -> None:
    header = ("kernel", "case", "shape", "regs", "spill st/ld", "smem B", "warps", "stages", "compile s", "grid")
    lines = [(r.kernel, r.case, r.shape, str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared),
              str(r.num_warps), str(r.num_stages), "cached" if r.cached else f"{r.compile_s:.2f}",
              "x".join(map(str, r.grid))) if r.hash else (r.kernel, r.case, r.shape, "ERROR", *[""] * 5, "")
             for r in rows]  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)] if lines else []
    for line in [header, tuple("-" * w for w in widths), *lines] if lines else []:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def run_cases(cases: list, arch: int) -> tuple[list, list]:
    """Compile every case's kernels. -> (rows, problems: one line per failure)."""
    rows, problems, earlier = [], [], {}
    recorder = target.CompileRecorder()
    case = None

    def on_launch(launch):  # called by each launch of the case being run
        row = row_from_launch(case, launch, earlier)
        rows.append(row)
        print(progress_line(len(rows), row), flush=True)

    with target.stand_in_driver(arch), h100_launch_heuristics(), recorder.patched(on_launch):
        for case in cases:
            first = len(rows)
            try:
                case.run()
            except Exception as error:  # the launcher itself failed (not a kernel's compilation)
                problems.append(f"{case.id}: the launcher raised {type(error).__name__}: {error}")
                print(f"      {case.id}: launcher raised {type(error).__name__}: {error}", flush=True)
            launched = {r.kernel for r in rows[first:]}  # a launch that failed to compile is a problem of its own
            missing = [k for k in case.kernels if k not in launched]
            if missing:
                problems.append(f"{case.id}: expected kernels never launched: {', '.join(missing)}")
    for row in rows:
        problems += [f"{row.kernel} in {row.case}: {p}" for p in row.problems]
    return rows, problems


def verdict(rows: list, problems: list, version: str, arch_name: str) -> str:
    distinct = {r.hash for r in rows if r.hash}
    if problems:
        return f"VERDICT: FAIL: {len(problems)} problem(s) with triton {version} for {arch_name}: " + "; ".join(
            summary(p) for p in problems)
    ok = [r for r in rows if r.hash]
    return (f"VERDICT: OK: {len(ok)} kernel launches ({len(distinct)} distinct specializations) compiled for "
            f"{arch_name} with triton {version}, no spills, max {max((r.registers for r in ok), default=0)} registers, "
            f"max {max((r.shared for r in ok), default=0)} B shared memory")


def prepare_environment(triton_path):
    """Before triton is imported: the requested Triton first on sys.path, no interpreter, a fresh cache dir."""
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before the check could choose it")
    if triton_path:
        sys.path.insert(0, os.path.abspath(triton_path))
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "0"):
        print("note: TRITON_INTERPRET was set; this check compiles for real, so it is unset here", flush=True)
    cache = tempfile.mkdtemp(prefix="hopper-compile-check-")
    os.environ["TRITON_CACHE_DIR"] = cache
    return cache


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-path", help="folder holding the triton package to use (put first on sys.path)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability to compile for (default 90; launch heuristics still see an H100)")
    parser.add_argument("--cases", default="all", help="'all', 'none' or comma-separated fnmatch patterns of ids")
    parser.add_argument("--extra-cases", action="append", default=[], help="Python file defining CASES")
    parser.add_argument("--list", action="store_true", help="list the case ids and exit")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cache = prepare_environment(args.triton_path)
    try:
        return run_check(args, cache, start)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run_check(args, cache: str, start: float) -> int:
    """main() after the environment is prepared. -> exit status."""
    try:
        import triton

        wanted = os.path.abspath(args.triton_path or "")
        if args.triton_path and os.path.commonpath([os.path.abspath(triton.__file__), wanted]) != wanted:
            raise RuntimeError(f"--triton-path {args.triton_path} given, but triton came from {triton.__file__}")
        release = target.triton_release()
        ptxas_path, ptxas_version = target.ptxas_tool(args.arch)
        arch_name = target.gpu_arch_name(args.arch)
        import torch

        cases = select_cases(all_cases(), args.cases)
        for path in args.extra_cases:
            cases += extra_cases(path)
    except (target.UnsupportedTritonError, RuntimeError, ImportError, ValueError) as error:
        print(f"hopper_compile_check: cannot run: {error}", file=sys.stderr, flush=True)
        return 2
    if args.list:
        print("\n".join(c.id for c in cases))
        return 0

    print(f"triton {triton.__version__} (release {release}, {os.path.dirname(triton.__file__)}), torch "
          f"{torch.__version__}; compiling {len(cases)} cases for {arch_name} with ptxas {ptxas_version} "
          f"({ptxas_path}); launch heuristics see an H100 ({target.H100_SM_COUNT} SMs, Tensor.is_cuda True); "
          f"cache {cache}", flush=True)
    rows, problems = run_cases(cases, args.arch)
    wall = time.perf_counter() - start
    print()
    print_table(rows)
    line = verdict(rows, problems, triton.__version__, arch_name)
    if args.json:
        report = dict(triton_version=triton.__version__, triton_file=triton.__file__, torch_version=torch.__version__,
                      arch=args.arch, arch_name=arch_name, ptxas=dict(path=ptxas_path, version=ptxas_version),
                      ptxas_flags=target.RELEASES[release], sm_count=target.H100_SM_COUNT,
                      cases=[dict(id=c.id, op=c.op, shape=c.shape, dtype=c.dtype, kernels=c.kernels) for c in cases],
                      kernels=[vars(r) for r in rows], problems=problems, ok=not problems, wall_s=round(wall, 2),
                      verdict=line)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"\nwall time {wall:.1f} s")
    print(line, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
