"""encoder.dtype: the frozen DINOv2 in bf16 (autocast), tf32 (fp32 with TF32 matmuls, ReDi's setting) or fp32.

* fp32 really is fp32: no autocast inside the forward even when the caller runs under bf16 autocast (every Linear
  sees float32 in and out, and the features equal an fp32 run outside any autocast bit for bit);
* bf16 really is bf16 (the Linears run in bf16) and stays within bf16's error of fp32;
* TF32 is switched on (tf32) or off (fp32) only inside the forward, and the process's flags come back after;
* the config's names map to the encoder's arguments as documented, and the ReDi/CoReDi recipes run it as ReDi does.
"""
import warnings
from pathlib import Path

import pytest
import torch

from coredi_fast.encoders.dinov2 import DINOv2Encoder, _tf32
from coredi_fast.training.builders import encoder_precision
from coredi_fast.training.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_VIT = dict(embed_dim=96, depth=3, num_heads=3)
BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding is off by up to half of this, relatively


def small_dino(dtype=None, allow_tf32=False) -> DINOv2Encoder:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random init (no weights here)
        encoder = DINOv2Encoder(weights=None, img_size=56, dtype=dtype, allow_tf32=allow_tf32, **SMALL_VIT)
    with torch.no_grad():  # off the init (layer scale starts at 1e-5), so every block matters
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return encoder


def images(b=4, side=64):
    return torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def linear_dtypes(encoder, run):
    """What every nn.Linear of the ViT saw during run(): (autocast on?, input dtype, output dtype) per call."""
    seen = []

    def hook(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype, output.dtype))

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    assert seen, "no Linear ran"
    return out, set(seen)


def test_fp32_runs_in_fp32_even_under_the_callers_bf16_autocast():
    encoder, x = small_dino(), images()
    reference = encoder(x)
    for outer in (False, True):  # the trainer calls it outside the engine's autocast; a user might not
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer):
            got, seen = linear_dtypes(encoder, lambda: encoder(x))
        assert seen == {(False, torch.float32, torch.float32)}, seen
        torch.testing.assert_close(got, reference, rtol=0, atol=0)


def test_bf16_runs_in_bf16_and_stays_within_bf16_error_of_fp32():
    x = images()
    fp32 = small_dino()(x)
    encoder = small_dino(torch.bfloat16)
    got, seen = linear_dtypes(encoder, lambda: encoder(x))
    assert {(on, out) for on, _, out in seen} == {(True, torch.bfloat16)}, seen
    assert got.dtype == torch.float32
    relative = ((got - fp32).norm() / fp32.norm()).item()
    # bf16 tolerance: a few units of bf16's 2^-8 over the whole tensor (measured 0.0029, i.e. 0.74 x 2^-8).
    assert 0 < relative < 4 * BF16_EPS, relative


def test_tf32_is_switched_only_inside_the_block_and_the_process_flags_come_back():
    cuda = torch.device("cuda")  # the flags are plain process-wide switches: settable without a GPU
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for process_wide in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = process_wide
            for inside in (False, True):
                with _tf32(inside, cuda):
                    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (inside,) * 2
                assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (process_wide,) * 2
            with _tf32(not process_wide, torch.device("cpu")):  # no TF32 on the CPU: nothing touched
                assert torch.backends.cuda.matmul.allow_tf32 == process_wide
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_config_names_map_to_the_encoders_arguments():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert encoder_precision("bf16", cuda) == (torch.bfloat16, False)
    assert encoder_precision("tf32", cuda) == (None, True)
    assert encoder_precision("fp32", cuda) == (None, False)
    assert {encoder_precision(name, cpu) for name in ("bf16", "tf32", "fp32")} == {(None, False)}
    with pytest.raises(ValueError, match="encoder.dtype"):
        load_config(None, ["encoder.dtype=fp16"])


@pytest.mark.parametrize("name", ["imagenet256_redi_xl", "imagenet256_redi_bn_xl", "imagenet256_coredi_xl",
                                  "imagenet256_jit_b16_coredi"])
def test_the_feature_recipes_run_dinov2_as_redi_does(name):
    # ReDi: DINOv2 without autocast, in a process that set torch.backends.cuda.matmul.allow_tf32 = True.
    assert load_config(str(CONFIGS / f"{name}.yaml")).encoder.dtype == "tf32"


@pytest.mark.gpu
def test_on_a_gpu_each_precision_runs_as_named():
    x = images().cuda()
    fp32_cpu = small_dino()(images())
    process_wide = torch.backends.cuda.matmul.allow_tf32
    flags = []

    def record(module, args, output):
        flags.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cuda"), output.dtype))

    for dtype, tf32, want in ((None, False, (False, False, torch.float32)), (None, True, (True, False, torch.float32)),
                              (torch.bfloat16, False, (False, True, torch.bfloat16))):
        encoder = small_dino(dtype, tf32).cuda()
        flags.clear()
        handle = encoder.model.blocks[0].attn.qkv.register_forward_hook(record)
        got = encoder(x).cpu()
        handle.remove()
        assert set(flags) == {want}
        tolerance = 1e-4 if want == (False, False, torch.float32) else 4 * BF16_EPS  # TF32 keeps 11 bits
        assert ((got - fp32_cpu).norm() / fp32_cpu.norm()).item() < tolerance
    assert torch.backends.cuda.matmul.allow_tf32 == process_wide  # the process's setting is back
