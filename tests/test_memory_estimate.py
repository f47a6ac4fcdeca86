"""`coredi_fast.memory_estimate` against independent references.

* static memory: the closed-form SiT parameter count (per block 18 d^2 + 15 d: qkv 3 d^2, proj d^2, MLP 8 d^2,
  adaLN 6 d^2, and their biases), not the meta-device build the module counts;
* activations: the estimate, extrapolated from depth 1-2 measurements at 4-16 latent tokens and 4-16 encoder
  tokens, against one direct measurement of a whole depth-3 model at a shape it never measured (batch 3, 64
  latent tokens, the real 256 encoder tokens). Eager is measured with `saved_tensors_hooks` (a different mechanism
  from the module's graph walk); `ours` with the graph walk (under hooks patch_dit turns its residual hand-over
  off, which would be a different step);
* the CPU bf16 autocast that the measurement relies on saves bf16 matmul operands, as CUDA autocast does;
* `skip_reason` and the CLI.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coredi_fast import memory_estimate as me
from coredi_fast.training.builders import build_denoiser, build_objective
from coredi_fast.training.config import load_config
from coredi_fast.training.engine import TrainModule

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def sit_parameter_count(d: int, depth: int, patch: int, channels: int, tokens: int, classes: int = 1000):
    """(trainable, frozen) parameters of a SiT with class dropout (null class row), learn_sigma off."""
    block = 18 * d * d + 15 * d
    patch_embed = channels * patch * patch * d + d
    t_embed = 256 * d + d + d * d + d
    y_embed = (classes + 1) * d
    final = (d * 2 * d + 2 * d) + (d * patch * patch * channels + patch * patch * channels)
    return depth * block + patch_embed + t_embed + y_embed + final, tokens * d  # frozen: the sin-cos pos_embed


@pytest.mark.parametrize("provider", ["eager", "ours"])
def test_static_memory_is_the_closed_form_parameter_count(provider):
    trainable, frozen = sit_parameter_count(d=1152, depth=28, patch=2, channels=4 + 8, tokens=256)
    assert 675e6 < trainable + frozen < 676e6  # SiT-XL/2 with 12 input channels: 675.2 M
    projector = 768 * 8                         # CoReDi's learned W (BatchNorm without affine parameters)
    est = me.estimate_train_step_memory("SiT-XL/2", 2, provider)
    assert est.grads * GIB == pytest.approx(4 * (trainable + projector), rel=1e-12)
    assert est.optimizer * GIB == pytest.approx(8 * (trainable + projector), rel=1e-12)
    # EMA class: every float of the state dict (pos_embed too); AdamWEMA: the trainable parameters.
    ema = trainable + (frozen if provider == "eager" else 0)
    assert est.ema * GIB == pytest.approx(4 * ema, rel=1e-12)
    # + the projector's buffers (standardization, PCA basis, BatchNorm statistics): ~10 K values.
    assert est.weights * GIB == pytest.approx(4 * (trainable + frozen + projector), rel=2e-5)


def test_cpu_bf16_autocast_saves_bf16_operands_like_cuda():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().sum()
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)  # the bf16 input and weight copies


def _small_step(provider: str, depth: int, latent: int):
    """The benchmark's recipe (TrainStep, profile "real") with SiT-B/2 at `depth`, on `latent`-side latents."""
    fused = provider == "ours"
    cfg = load_config(str(me.DEFAULT_RECIPE), ["model.name=SiT-B/2", f"model.fused_ops={'on' if fused else 'off'}",
                                               "model.compile=none", "method.projector.init=orthogonal"])
    cfg.model.overrides = {"depth": depth}
    objective = build_objective(cfg, 4, latent, None, None, fused=fused)
    return TrainModule(build_denoiser(cfg, objective.model_channels, latent, 1000, fused=fused), objective)


def _direct_saved_bytes(provider: str, batch: int, latent: int, depth: int, feature_tokens: int) -> int:
    torch.manual_seed(0)
    module = _small_step(provider, depth, latent).train()
    x = torch.randn(batch, 4, latent, latent)
    features = torch.randn(batch, feature_tokens, 768)
    y = torch.randint(0, 1000, (batch,))
    noise = module.objective.draw_noise(batch, label_dropout=0.1)
    held = [*module.parameters(), *module.buffers(), x, features, y, *(n for n in noise if n is not None)]
    exclude = {t.untyped_storage().data_ptr() for t in held}
    if provider == "eager":
        storages = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in exclude:
                storages[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            module(x, features, y, noise)
        return sum(storages.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(x, features, y, noise).loss
    return me.saved_bytes(loss, exclude)


@pytest.mark.parametrize("provider", ["eager", "ours"])
def test_activations_extrapolate_to_an_unmeasured_shape(provider):
    batch, image_size, depth = 3, 128, 3           # latent 16: 64 tokens per image (measured: 4 and 16)
    est = me.estimate_train_step_memory("SiT-B/2", batch, provider, image_size=image_size,
                                        overrides={"depth": depth})
    direct = _direct_saved_bytes(provider, batch, image_size // 8, depth, feature_tokens=256)
    assert est.activations * GIB == pytest.approx(direct, rel=1e-4)  # exact in practice (<= 16 B apart)
    # and the per-token part is what it must be: eager saves 48 d bytes per token per block (fp32 LN inputs and
    # outputs 4 x 4d, bf16 qkv input/out 8d, attention out 2d, proj out 2d, fc1 in 2d, GELU in/out 16d, fc2 out
    # 2d); the fused norms keep one fp32 tensor (h) for LN + modulate instead of two: 40 d.
    block = me.measure_activations("SiT-B/2", provider == "ours").block
    heads = 12
    assert block.per_token == pytest.approx((40 if provider == "ours" else 48) * 768 + 8 + 8 + 4 * heads, abs=0.5)


def test_a_saved_attention_score_matrix_shows_up_as_misfit(monkeypatch):
    # The math SDPA kernel saves the (B, H, T, T) softmax: not affine in B·T. With the flash kernel the misfit is
    # ~1e-7 B (the test above); with three token counts measured, the scores cannot hide in the fit.
    attention = sys.modules["coredi_kernels.attention"]
    forced = attention.force_attention_backend
    monkeypatch.setattr(attention, "force_attention_backend", lambda name: forced("sdpa_math"))
    with pytest.warns(UserWarning, match="not affine"):
        profile = me.measure_activations.__wrapped__("SiT-S/2", False)  # uncached: keep the cache clean
    assert profile.block.residual > me.MISFIT_TOLERANCE


def test_persistent_grads_add_the_gradients():
    est = me.estimate_train_step_memory("SiT-B/2", 16, "eager")
    kept = me.estimate_train_step_memory("SiT-B/2", 16, "eager", persistent_grads=True)
    assert est.activations > est.grads
    assert kept.total - est.total == pytest.approx(est.grads, rel=1e-9)


def test_skip_reason_says_why_a_small_card_cannot_hold_the_step():
    reason = me.skip_reason("SiT-B/2", 16, "ours", 2 * GIB, card_name="a 2 GiB card")
    assert reason is not None and reason.startswith("ours: estimated ")
    assert "a 2 GiB card" in reason and "activations" in reason and "1.9 GiB usable" in reason
    assert me.skip_reason("SiT-B/2", 16, "ours", 1000 * GIB) is None
    with pytest.raises(ValueError, match="provider"):
        me.skip_reason("SiT-B/2", 16, "fast", 1000 * GIB)


def test_cli_prints_every_provider(tmp_path):
    out = tmp_path / "estimate.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "coredi_fast.memory_estimate", "--model", "SiT-S/2", "--batch", "64",
                           "--card-gib", "80", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line.split() for line in proc.stdout.splitlines() if len(line.split()) == 10]  # the table's rows
    rows = {cells[0]: cells for cells in table}
    for provider in me.PROVIDERS:
        assert rows[provider][-1] == "yes", proc.stdout
    estimates = json.loads(out.read_text())
    assert [e["provider"] for e in estimates] == list(me.PROVIDERS)
    assert all(0 < e["total"] < 80 for e in estimates)
