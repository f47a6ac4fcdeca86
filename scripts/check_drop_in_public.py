"""patch_dit / patch_jit on the PUBLISHED model files of five DiT codebases, against the unpatched models, on CPU.

    git clone https://github.com/facebookresearch/DiT; git clone https://github.com/sihyun-yu/REPA
    git clone https://github.com/chuanyangjin/fast-DiT; git clone https://github.com/hustvl/LightningDiT
    git clone https://github.com/LTH14/JiT
    TRITON_INTERPRET=1 python scripts/check_drop_in_public.py --dit DiT --repa REPA --fast-dit fast-DiT \
        --lightningdit LightningDiT --jit JiT

Any subset of the five may be given. Each model file is imported from its checkout as it is, built small (width 64,
depth 2-4, 16 tokens), given random weights (adaLN-Zero would zero every output), and run forward + backward
unpatched and patched, with the PyTorch backend and with the Triton kernels (under the interpreter on CPU). It
prints, per model and variant, the largest difference of any output and of any gradient (input and every parameter)
relative to that tensor's largest value, and what the patch fused (`patch_report`). Exit status 1 if a difference
exceeds 1e-4 or the state dict changed.

To import the files on a machine without a GPU, this process (only) turns `torch.compile` decorators into no-ops
(LightningDiT's and JiT's blocks use them; the patch replaces those forwards anyway), makes `Tensor.cuda` return the
tensor (JiT builds its rope tables with `.cuda()`), stubs `fairscale` (LightningDiT's rmsnorm.py imports it for
classes the models do not use), and gives timm's `Attention` REPA's expected LayerNorm qk-norm default (timm >= 1.0
asks for `norm_layer` explicitly).
"""
import argparse
import copy
import functools
import importlib
import sys
import types
from pathlib import Path

import torch

from coredi_kernels import force_backend, patch_dit, patch_jit, patch_report

TOLERANCE = 1e-4


def cpu_only_shims() -> None:
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    layers = "fairscale.nn.model_parallel.layers"
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
                 layers):
        sys.modules.setdefault(name, types.ModuleType(name))
    for name in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear"):
        setattr(sys.modules[layers], name, object)


def load(folder: Path, module: str):
    """Import `module` from a checkout (its own `models` / `util` packages, not another checkout's)."""
    for key in [k for k in sys.modules if k.split(".")[0] in ("models", "util", "model_jit")]:
        del sys.modules[key]
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.pop(0)


def randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def forward_backward(model, x, t, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x, t, y)
    outs = [out[0], *out[1]] if isinstance(out, tuple) else [out]  # REPA returns (x, zs)
    sum((o * torch.linspace(-1, 2, o.numel()).reshape(o.shape)).sum() for o in outs).backward()
    return outs, [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def relative(got, want):
    """Largest |Δ| of a tensor relative to its largest |value| (tensors < 1e-6 of the largest left out: gradients
    that are zero in exact arithmetic, such as k_norm's bias)."""
    largest = max(w.abs().max() for w in want)
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)
               if w.abs().max() > 1e-6 * largest)


def check(name: str, model, patch, channels=4, size=8) -> bool:
    model = randomize(model)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, channels, size, size, generator=g), torch.rand(2, generator=g), torch.tensor([1, 7])
    want = forward_backward(model, x, t, y)
    patched = patch(copy.deepcopy(model))
    ok = patched.state_dict().keys() == model.state_dict().keys()
    for backend in ("torch", "triton"):
        with force_backend(backend):
            got = forward_backward(patched, x, t, y)
        out, grads = relative(got[0], want[0]), relative(got[1], want[1])
        ok &= out <= TOLERANCE and grads <= TOLERANCE
        print(f"{name:58s} {backend:6s}  outputs {out:.1e}  gradients {grads:.1e}", flush=True)
    report = patch_report(patched)
    print(f"    {report.patch}: qk-norm (+RoPE) fused in {report.attentions_fused_qk}/{report.blocks} attentions, "
          f"{report.attentions_dispatched} through the dispatcher, {report.norm_sites_fused}/{report.norm_sites} "
          f"norm sites fused, {report.residual_adds_fused} residual adds fused", flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("dit", "repa", "fast-dit", "lightningdit", "jit"):
        parser.add_argument(f"--{name}", type=Path, help=f"a checkout of the {name} repository")
    args = parser.parse_args(argv)
    cpu_only_shims()
    small = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=10)
    ok = True
    if args.dit:
        ok &= check("facebookresearch/DiT", load(args.dit, "models").DiT(depth=2, **small), patch_dit)
    if args.repa:
        repa = load(args.repa, "models.sit")
        repa.Attention = functools.partial(repa.Attention, norm_layer=torch.nn.LayerNorm)
        for qk_norm in (False, True):
            model = repa.SiT(decoder_hidden_size=64, encoder_depth=2, depth=3, use_cfg=True, z_dims=[24],
                             projector_dim=32, qk_norm=qk_norm, fused_attn=True, **small)
            ok &= check(f"sihyun-yu/REPA qk_norm={qk_norm}", model, patch_dit)
    if args.fast_dit:
        model = load(args.fast_dit, "models").DiT(depth=2, **small)
        ok &= check("chuanyangjin/fast-DiT (every block checkpointed)", model, patch_dit)
    if args.lightningdit:
        lightning = load(args.lightningdit, "models.lightningdit")
        variants = {"released (RMSNorm, SwiGLU, RoPE)": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True),
                    "+ qk-norm": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=True),
                    "qk-norm, no RoPE": dict(use_swiglu=True, use_rmsnorm=True, use_qknorm=True),
                    "+ qk-norm, wo_shift": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=True,
                                                wo_shift=True),
                    "+ qk-norm, use_checkpoint": dict(use_swiglu=True, use_rope=True, use_rmsnorm=True,
                                                      use_qknorm=True, use_checkpoint=True),
                    "LayerNorm, RoPE": dict(use_rope=True),
                    "LayerNorm, RoPE, qk-norm": dict(use_rope=True, use_qknorm=True),
                    "LayerNorm, RoPE, wo_shift": dict(use_rope=True, wo_shift=True)}
        for variant, kwargs in variants.items():
            model = lightning.LightningDiT(depth=2, **small, **kwargs)
            ok &= check(f"hustvl/LightningDiT {variant}", model, patch_jit if kwargs.get("use_rmsnorm") else patch_dit)
    if args.jit:
        model = load(args.jit, "model_jit").JiT(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=4,
                                                num_heads=4, num_classes=10, bottleneck_dim=8, in_context_len=2,
                                                in_context_start=1, proj_drop=0.2)
        ok &= check("LTH14/JiT (2 in-context tokens from block 1)", model, patch_jit, channels=3, size=16)
    print("OK" if ok else f"FAILED: a difference above {TOLERANCE} or a changed state dict")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
