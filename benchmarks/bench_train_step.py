"""One CoReDi training step end to end: plain PyTorch eager, per-block torch.compile, and ours, side by side.

    pytest benchmarks/bench_train_step.py --bench-profile=real -q    # SiT-B/2, L/2, XL/2 at 256 px, batch 128, CUDA
    pytest benchmarks/bench_train_step.py -q                         # SiT-Micro/2 + a tiny DINOv2 on CPU (smoke)
    BENCH_TRAIN_MODELS=SiT-XL/2 pytest benchmarks/bench_train_step.py --bench-profile=real   # one model only

The step is the trainer's (`coredi_fast.training.loop.Trainer.train_step`, minus logging): a VAE latent sampled
from stored moments, the frozen DINOv2-B/14-reg (random init; bf16 autocast on GPU) on 256-px uint8 images resized
to 224, the CoReDi objective (learned projector + BatchNorm + the default cov regularizer, joint loss), bf16
autocast over fp32 weights, backward, AdamW, the fp32 EMA, and the trainer's non-finite check (one host sync per
step).

Providers (each builds its own model from the same seed; the table's "x compile" is the speed-up over `compile`):
    eager          plain PyTorch: SDPA attention, torch AdamW(fused) + the separate foreach EMA
    compile        eager + `block.compile()` on every transformer block: the strong baseline (perf_anchors.md §1c)
    ours           coredi_kernels (patch_dit: fused LayerNorm+modulate and residuals, attention dispatch = cuDNN on
                   Hopper; the fused joint embedding), the encoder replayed as a CUDA graph + AdamWEMA's one-pass
                   native AdamW+EMA when the library is built for the device (else torch AdamW + the separate EMA:
                   the trainer's optim.fused_ema=auto); the "optimizer" column of the table says which ran
    ours+compile   ours + the same per-block compile
    ours, no sync  ours without the non-finite check's host sync (`.item()` before the backward): what that one
                   wait per step costs, i.e. what a check that stays on the device would win (measured last, so it
                   never costs one of the four above their time)

FLOP convention (nanoGPT/PaLM-style model FLOPs; 2 FLOPs per multiply-add; the DiT paper's "Gflops" are MACs):
    forward per image = 2 * [depth * (12 d^2 N + 2 N^2 d + 6 d^2) + N p^2 C_in d + 2 d^2 + N d p^2 C_out + 256 d + d^2]
    (per block: qkv + proj + MLP = 12 d^2 per token, attention scores and values 2 N^2 d, adaLN 6 d^2 per image;
    then patch embedding, final adaLN + linear, timestep MLP), training = 3 x forward (backward = 2 x forward).
    SiT-XL/2 at 256 px (d 1152, N 256, 12 input channels): 237 GFLOP forward, 712 GFLOP per trained image. The
    encoder, projector and optimizer are not counted: they are overhead the denoiser's MFU has to absorb.
    MFU = model FLOP/s / the card's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; A100: 312).

Also here: `test_engine_step` times the same step through our three engines (single process, DDP with world size
1, DeepSpeed ZeRO-2 with world size 1); the DeepSpeed row skips when deepspeed is not installed.

At the end a table lists img/s, MFU, peak memory and the speed-up over `compile` for every row.
"""
import gc
import json
import os
import warnings
from pathlib import Path

import pytest
import results_rows
import torch

from coredi_fast.optim import AdamWEMA, ema_view, native
from coredi_fast.training.config import load_config
from coredi_fast.training.distributed import DistInfo
from coredi_fast.training.ema import EMA
from coredi_fast.training.engine import TrainModule, build_engine, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {
    # CPU: fp32 (the trainer does not autocast on CPU), a 2-block width-64 SiT and a 1-block width-32 DINOv2.
    "tiny": dict(models=("SiT-Micro/2",), batch=4, image=32, latent=4, encoder_size=28, calls=1, rounds=10,
                 encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2), precision="fp32"),
    "real": dict(models=("SiT-B/2", "SiT-L/2", "SiT-XL/2"), batch=128, image=256, latent=32, encoder_size=224,
                 calls=2, rounds=5, encoder_kwargs={}, precision="bf16"),
}
PROVIDERS = ("eager", "compile", "ours", "ours+compile", "ours, no sync")
NO_SYNC = "ours, no sync"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}
_SUMMARY: list = []  # rows for the end-of-module table


def models_for(profile: str) -> tuple:
    chosen = os.environ.get("BENCH_TRAIN_MODELS")
    return tuple(chosen.split(",")) if chosen else PROFILES[profile]["models"]


def sit_forward_flops(model) -> float:
    """Real FLOPs of one image's forward through a SiT/DiT (see the module docstring)."""
    d, n, depth = model.hidden_size, model.x_embedder.num_patches, len(model.blocks)
    p, c_in, c_out = model.patch_size, model.in_channels, model.out_channels
    macs = (depth * (12 * d * d * n + 2 * n * n * d + 6 * d * d) + n * p * p * c_in * d + 2 * d * d
            + n * d * p * p * c_out + 256 * d + d * d)
    return 2.0 * macs


def peak_tflops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def release_memory():
    torch._dynamo.reset()  # compiled graphs hold on to the previous provider's modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------- the step


def train_config(profile: str, model_name: str, fused: bool, fused_ema: bool):
    """The trainer's config: the shipped CoReDi XL recipe (real) or a tiny CoReDi (tiny), with this model."""
    p = PROFILES[profile]
    overrides = [f"model.name={model_name}", f"data.global_batch_size={p['batch']}", "model.compile=none",
                 f"model.fused_ops={'on' if fused else 'off'}", f"optim.fused_ema={'on' if fused_ema else 'off'}",
                 f"run.precision={p['precision']}"]
    if profile == "real":
        return load_config(str(ROOT / "configs" / "imagenet256_coredi_xl.yaml"), overrides)
    dim = p["encoder_kwargs"]["embed_dim"]
    return load_config(None, overrides + [f"method.projector.feature_dim={dim}", "method.projector.dim=4",
                                          "method.projector.regularizer=cov", "model.learn_sigma=false"])


class TrainStep:
    """Everything one provider needs: built like `Trainer.__init__`, stepped like `Trainer.train_step`."""

    def __init__(self, profile: str, model_name: str, provider: str, device: torch.device, engine_kind="single",
                 ds_config=None):
        from coredi_fast.encoders.dinov2 import DEFAULT_DINOV2, DINOv2Encoder
        from coredi_fast.method import FeatureStatistics
        from coredi_fast.training.builders import build_denoiser, build_objective

        p = PROFILES[profile]
        if device.type == "cuda" and device.index is None:  # DDP wants an indexed device, as the trainer has
            device = torch.device("cuda", torch.cuda.current_device())
        self.host_sync = provider != NO_SYNC
        ours = provider.startswith("ours")
        self.fused_ema = ours and native.is_available(device.type)
        cfg = train_config(profile, model_name, fused=ours, fused_ema=self.fused_ema)
        self.cfg, self.device, self.batch = cfg, device, p["batch"]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "random init" warning: no weights can be downloaded here
            dtype = torch.bfloat16 if device.type == "cuda" else None
            self.encoder = DINOv2Encoder(DEFAULT_DINOV2, weights=None, img_size=p["encoder_size"], dtype=dtype,
                                         **p["encoder_kwargs"]).to(device)
        if ours and device.type == "cuda":  # as the trainer does with encoder.cuda_graph (on by default)
            from coredi_fast.encoders.cuda_graph import GraphedEncoder

            self.encoder = GraphedEncoder(self.encoder)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (self.batch, 3, p["image"], p["image"]), generator=g,
                                    dtype=torch.uint8).to(device)
        self.moments = torch.cat([torch.randn(self.batch, 4, p["latent"], p["latent"], generator=g) * 4,
                                  torch.full((self.batch, 4, p["latent"], p["latent"]), 0.1)], dim=1).to(device)
        self.labels = torch.randint(0, 1000, (self.batch,), generator=g).to(device)
        with torch.no_grad():
            stats = FeatureStatistics(self.encoder.embed_dim).update(self.encoder(self.images).float().cpu())

        self.objective = build_objective(cfg, 4, p["latent"], self.encoder, stats, fused=ours)
        self.denoiser = build_denoiser(cfg, self.objective.model_channels, p["latent"], 1000, fused=ours)
        self.module = TrainModule(self.denoiser, self.objective).to(device)
        if provider.endswith("compile"):
            for block in self.denoiser.blocks:
                block.compile()

        o = cfg.optim
        groups = [{"params": [q for q in self.denoiser.parameters() if q.requires_grad], "lr": o.lr,
                   "weight_decay": o.weight_decay}]
        projector_groups = self.objective.projector.param_groups(o.lr, o.weight_decay)
        for group in projector_groups if self.fused_ema else ():
            group["ema"] = False
        optimizer = build_optimizer(groups + projector_groups, o.lr, o.betas, o.weight_decay, o.eps, device,
                                    fused_ema=self.fused_ema, ema_decay=o.ema_decay)
        dist_info = DistInfo(0, 0, 1, device, engine_kind)
        self.engine = build_engine(self.module, optimizer, dist_info, cfg.run.precision, 0.0, ds_config)
        self.ema = ema_view(self.denoiser, self.engine.optimizer) if self.fused_ema else EMA(self.denoiser,
                                                                                            o.ema_decay)
        self.step_count = 0
        self.flops_per_step = 3 * sit_forward_flops(self.denoiser) * self.batch
        self.optimizer_name = (f"AdamWEMA[{optimizer.backend}]" if isinstance(optimizer, AdamWEMA)
                               else "AdamW+EMA")

    def __call__(self):
        from coredi_fast.encoders.vae import sample_posterior

        cfg, device = self.cfg, self.device
        gen = torch.Generator(device=device).manual_seed(self.step_count)
        eps = torch.randn((self.batch, 4) + self.moments.shape[-2:], device=device, generator=gen)
        x = sample_posterior(self.moments, scale=cfg.vae.scale, noise=eps)
        with torch.no_grad():
            features = self.encoder(self.images)
        noise = self.objective.draw_noise(self.batch, device=device, generator=gen,
                                          label_dropout=cfg.model.class_dropout_prob)
        out = self.engine(x, features, self.labels, noise)
        if self.host_sync and not torch.isfinite(out.loss.detach()).item():  # the trainer's check (a host sync)
            raise FloatingPointError("non-finite loss in the benchmark step")
        self.engine.backward(out.loss)
        if self.fused_ema:
            self.ema.set_decay(cfg.optim.ema_decay)
        self.engine.step()
        self.ema.update(self.denoiser, cfg.optim.ema_decay)
        self.step_count += 1


def record(benchmark, step: TrainStep, calls: int, model_name: str, provider: str, engine: str, table: str,
           estimated_gib=None):
    """Adds img/s, MFU and peak memory (and the estimate made before, if any) to extra_info and to the
    end-of-module table; emits the row to `table`."""
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.median / calls
    img_s = step.batch / seconds
    tflops = step.flops_per_step / seconds / 1e12
    peak = peak_tflops(step.device)
    mem = torch.cuda.max_memory_allocated(step.device) / 2**30 if step.device.type == "cuda" else None
    row = {"model": model_name, "batch": step.batch, "engine": engine, "provider": provider,
           "optimizer": step.optimizer_name, "ms": seconds * 1e3, "img/s": img_s, "TFLOP/s": tflops,
           "MFU %": None if peak is None else 100 * tflops / peak, "peak GiB": mem}
    if estimated_gib is not None:
        row["est. GiB"] = estimated_gib
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("model", "provider")})
    _SUMMARY.append(row)
    results_rows.emit(table, row)


# ----------------------------------------------------------------------------------------------- benchmarks


def pytest_generate_tests(metafunc):
    """Parametrize by the models of the profile this session runs (the conftest's rule: option, env, CUDA)."""
    if "model_name" in metafunc.fixturenames:
        profile = (metafunc.config.getoption("--bench-profile") or os.environ.get("BENCH_PROFILE")
                   or ("real" if torch.cuda.is_available() else "tiny"))
        metafunc.parametrize("model_name", models_for(profile if profile in PROFILES else "tiny"))


@pytest.fixture(scope="module")
def memory_estimates(bench_profile, bench_device) -> dict:
    """{(model, provider): MemoryEstimate} for every step this module times, estimated on the CPU and emitted as
    the `memory estimate` table before the first step runs (coredi_fast.memory_estimate). On a GPU, a provider
    whose estimate does not fit the card is skipped with the estimate's breakdown instead of dying of OOM; an
    estimate that fails is reported as a row and leaves its provider to run."""
    from coredi_fast.memory_estimate import DEFAULT_MARGIN, PROVIDERS as ESTIMATED_PROVIDERS, cuda_card
    from coredi_fast.memory_estimate import estimate_train_step_memory

    p = PROFILES[bench_profile]
    card = cuda_card(bench_device) if bench_device.type == "cuda" else None
    estimates = {}
    for model_name in models_for(bench_profile):
        for provider in ESTIMATED_PROVIDERS:
            try:
                est = estimate_train_step_memory(model_name, p["batch"], provider, image_size=p["image"],
                                                 precision=p["precision"])
            except Exception as error:  # the estimate advises; it must never cost the measurement
                estimates[model_name, provider] = None
                results_rows.emit("memory estimate", {"model": model_name, "provider": provider,
                                                      "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            estimates[model_name, provider] = est
            row = {"model": model_name, "batch": p["batch"], "provider": provider,
                   **{f"{part} GiB": getattr(est, part) for part in ("weights", "grads", "optimizer", "ema",
                                                                    "encoder", "activations", "workspace")},
                   "total GiB": est.total,
                   "usable GiB": None if card is None else est.usable_gib(card[1], DEFAULT_MARGIN),
                   "fits": None if card is None else ("yes" if est.fits(card[1]) else "NO")}
            results_rows.emit("memory estimate", row)
    return {"estimates": estimates, "card": card}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(measure, benchmark, bench_profile, bench_device, model_name, provider, memory_estimates):
    if bench_profile == "tiny" and provider.endswith("compile"):
        pytest.skip("torch.compile on CPU spends its time in Inductor's C++ build: the real profile measures it")
    estimated_as = "ours" if provider == NO_SYNC else provider  # the same tensors
    estimate, card = memory_estimates["estimates"][model_name, estimated_as], memory_estimates["card"]
    if estimate is not None and card is not None and not estimate.fits(card[1]):
        pytest.skip(f"{provider}: estimated {estimate.total:.1f} GiB > {estimate.usable_gib(card[1]):.1f} GiB "
                    f"usable on {card[0]} ({estimate.breakdown()})")
    release_memory()
    p = PROFILES[bench_profile]
    step = TrainStep(bench_profile, model_name, provider, bench_device)
    measure(step, flops=step.flops_per_step, calls_per_round=p["calls"], rounds=p["rounds"], emit=False,
            op="train step", model=model_name, batch=p["batch"], provider=provider)
    record(benchmark, step, p["calls"], model_name, provider, "single", "train step",
           None if estimate is None else estimate.total)
    del step
    release_memory()


@pytest.fixture(scope="module")
def process_group(bench_device):
    """A 1-process group (NCCL on GPU, gloo on CPU) for the DDP and DeepSpeed engines."""
    import torch.distributed as dist

    from coredi_fast.training.distributed import _free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl" if bench_device.type == "cuda" else "gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def deepspeed_config(batch: int, precision: str) -> dict:
    ds = json.loads((ROOT / "ds_zero2.json").read_text())
    ds.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_clipping=0.0)
    if precision == "fp32":
        ds["torch_autocast"]["enabled"] = False
    return ds


@pytest.mark.parametrize("engine", ("single", "ddp", "deepspeed"))
def test_engine_step(measure, benchmark, bench_profile, bench_device, process_group, engine):
    """The `ours` step of the largest model through each engine with world size 1: what DDP / ZeRO-2 cost."""
    ds_config = None
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (the GPU machines have none)")
        ds_config = deepspeed_config(PROFILES[bench_profile]["batch"], PROFILES[bench_profile]["precision"])
    release_memory()
    p = PROFILES[bench_profile]
    model_name = models_for(bench_profile)[-1]
    step = TrainStep(bench_profile, model_name, "ours", bench_device, engine_kind=engine, ds_config=ds_config)
    measure(step, flops=step.flops_per_step, calls_per_round=p["calls"], rounds=p["rounds"], emit=False, op="engine",
            model=model_name, batch=p["batch"], provider=engine)
    record(benchmark, step, p["calls"], model_name, "ours", engine, "train step engines")
    if engine == "deepspeed":
        step.engine.engine.destroy()
    del step
    release_memory()


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    """After the module: img/s, MFU and peak memory of every row, and the speed-up over `compile`."""
    yield
    if not _SUMMARY:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    base = {r["model"]: r["ms"] for r in _SUMMARY if r["provider"] == "compile" and r["engine"] == "single"}
    columns = ["model", "engine", "provider", "optimizer", "ms", "img/s", "TFLOP/s", "MFU %", "peak GiB", "est. GiB",
               "x compile"]

    def fmt(v):
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    table = [columns]
    for r in _SUMMARY:
        r["x compile"] = base[r["model"]] / r["ms"] if r["model"] in base else None
        table.append([fmt(r.get(c)) for c in columns])
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with capture.global_and_fixture_disabled():  # module teardown output is captured otherwise
        reporter.write_line("")
        reporter.write_sep("-", f"train step on {device}: img/s, MFU (model FLOPs vs dense bf16 peak), peak memory")
        for row in table:
            reporter.write_line("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
