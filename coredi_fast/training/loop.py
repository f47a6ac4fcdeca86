"""The training run: `run(cfg)` builds everything from a `TrainConfig`, trains, and writes what a user looks at.

Each step:
    batch   = next(loader)                                   this rank's slice of the global batch
    images  = mirrored per sample with data.hflip            coins for the global batch, see data/flip.py
    x       = VAE latent sampled from the stored moments, or pixels in [-1, 1]
    f       = encoder(images)                                frozen, no_grad, at encoder.dtype (ReDi: tf32)
    noise   = draws for the *global* batch from a generator seeded by (seed, step), sliced to this rank
    loss    = objective(denoiser, x, f, y, noise)            projector + joint loss + regularizer
    backward, clip, step, EMA

Because every random draw depends only on (seed, step) and the data order only on (seed, epoch), a run is the same
on 1 or N processes (same global batch) and after a resume. Rank 0 writes: metrics.jsonl (+ TensorBoard), sample
grids, the feature-space picture, checkpoints, and a loss-curve plot at the end.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from ..data.flip import check_hflip, draw_hflip_mask, hflip_where
from ..optim import ema_view, resolve_fused_ema
from ..profiling import ProfilerWindow, annotate_module, nvtx_range
from .cache_source import stale_cache_reason, write_cache_source
from .builders import (build_dataset, build_denoiser, build_encoder, build_objective, compute_feature_statistics,
                       image_stream_shape, merge_statistics, pixel_patch, use_fused_ops)
from .checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, resume_candidates, rng_state,
                         save_checkpoint, set_aside, set_rng_state)
from .config import TrainConfig
from .distributed import (DistInfo, all_reduce_max, all_reduce_mean, barrier, broadcast_object,
                          cleanup_distributed, setup_distributed)
from .ds_config import load_ds_config
from .ema import EMA
from .engine import TrainModule, build_engine, build_optimizer
from .init_from import init_from_checkpoint, starts_fresh
from .metrics import MetricsLogger
from .resume_changes import check_resume_changes, configured_hyperparameters, keep_configured_hyperparameters
from .run_folder import RunFolder, RunSetupError
from .stop_signals import StopRequest, TrainingStopped

logger = logging.getLogger("coredi_fast.train")


class NonFiniteLossError(RuntimeError):
    pass


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    # One stream per (seed, step): independent of world size, resumable, untouched by sampling or logging.
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def _rank_slice(dist: DistInfo, global_batch: int) -> tuple[int, int]:
    local = global_batch // dist.world_size
    return dist.rank * local, (dist.rank + 1) * local


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: DistInfo, ds_config: Optional[dict] = None):
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.out = Path(cfg.run.out_dir)
        if cfg.data.global_batch_size % dist.world_size:
            raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
                             f"{dist.world_size} processes")
        if dist.is_main:
            for sub in ("checkpoints", "samples"):
                (self.out / sub).mkdir(parents=True, exist_ok=True)
        barrier()

        # ---- data
        from ..data import build_loader

        self.dataset = build_dataset(cfg)
        check_hflip(cfg.data.hflip, self.dataset.has_moments, cfg.data.path)
        self.image_channels, self.image_size = image_stream_shape(self.dataset, cfg)
        self.pixel_patch = pixel_patch(cfg)
        self.latent_space = bool(self.dataset.has_moments)
        self.loader = build_loader(self.dataset, global_batch_size=cfg.data.global_batch_size, rank=dist.rank,
                                   world_size=dist.world_size, seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                                   device=self.device, backend=cfg.data.loader)

        # ---- frozen encoder, feature statistics, objective, denoiser
        self.encoder = build_encoder(cfg, self.device)
        if self.encoder is not None and self.device.type == "cuda" and cfg.encoder.cuda_graph:
            from ..encoders.cuda_graph import GraphedEncoder

            self.encoder = GraphedEncoder(self.encoder)
        statistics = self._feature_statistics()
        # Computing the statistics draws from the global RNG and reading their cache does not: reseed, so the
        # model's initial weights are the same either way (a restart is the same run as a fresh start).
        torch.manual_seed(cfg.run.seed + dist.rank)
        fused = use_fused_ops(cfg, self.device)
        self.objective = build_objective(cfg, self.image_channels, self.image_size, self.encoder, statistics, fused)
        self.denoiser = build_denoiser(cfg, self.objective.model_channels, self.image_size,
                                       self.dataset.num_classes, fused)
        self.initialized_from = self._init_from()  # before the optimizer and the EMA: both start from these weights
        self.module = TrainModule(self.denoiser, self.objective).to(self.device)
        mode = None if cfg.model.compile_mode == "default" else cfg.model.compile_mode
        if cfg.model.compile == "blocks":
            # Static graphs: each block sees one shape for the whole run (JiT's blocks after the in-context insert
            # another one), so automatic dynamic shapes would only make Inductor's kernels symbolic in T.
            for block in self.denoiser.blocks:
                block.compile(mode=mode, dynamic=False)
        elif cfg.model.compile == "model":
            self.denoiser.compile(mode=mode)

        # ---- optimizer, engine, EMA
        o = cfg.optim
        groups = [{"params": [p for p in self.denoiser.parameters() if p.requires_grad], "lr": o.lr,
                   "weight_decay": o.weight_decay, "name": "denoiser"}]
        projector_groups = self.objective.projector.param_groups(o.lr, o.weight_decay)
        # optim.fused_ema: AdamWEMA updates the denoiser's fp32 EMA inside the optimizer pass (the projector has none,
        # as with the separate EMA); the checkpoint's "ema" entry is the same either way.
        self.fused_ema = resolve_fused_ema(o.fused_ema, self.device)
        zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0) if ds_config else None
        if self.fused_ema and zero_stage not in (None, 1, 2):  # the EMA view knows ZeRO-1/2's partitions only
            if o.fused_ema == "on":
                raise ValueError(f"optim.fused_ema=on works with DeepSpeed ZeRO stage 1 or 2, the json says stage "
                                 f"{zero_stage}; set optim.fused_ema=off")
            self.fused_ema = False
        if self.fused_ema:
            for group in projector_groups:
                group["ema"] = False
        optimizer = build_optimizer(groups + projector_groups, o.lr, o.betas, o.weight_decay, o.eps, self.device,
                                    fused_ema=self.fused_ema, ema_decay=o.ema_decay)
        self.engine = build_engine(self.module, optimizer, dist, cfg.run.precision, o.grad_clip, ds_config)
        self.ema = ema_view(self.denoiser, self.engine.optimizer) if self.fused_ema else EMA(self.denoiser, o.ema_decay)
        if dist.is_main:
            print(f"optimizer: {_describe_optimizer(optimizer)}", flush=True)
        if self.device.type == "cuda" and cfg.model.compile != "model":  # not inside a whole-model graph
            annotate_module(self.denoiser, "denoiser", methods=("forward", "forward_tokens"))

        self.step = 0
        self.skipped_steps = 0
        self.stop = StopRequest()      # SIGTERM / SIGINT: finish the step, checkpoint, exit (installed by fit)
        self.stop_agreed = False
        self.nonfinite_streak = 0      # steps in a row skipped for a non-finite loss: no checkpoint during one
        self.corrupt_samples = 0       # samples that did not decode (this process; a device tensor once counted)
        self._checkpoint_due = False   # a periodic checkpoint put off by such a streak
        self.metrics = MetricsLogger(self.out, dist.is_main, cfg.run.tensorboard)
        self.feature_vis = None
        self._vae = None

    # ------------------------------------------------------------------ set-up helpers

    def _feature_statistics(self):
        cfg = self.cfg
        if self.encoder is None:
            return None
        from ..method import FeatureStatistics, load_redi_pca

        if cfg.encoder.pca_file:  # ReDi's own basis, exactly as stored (checked by preflight)
            stats = load_redi_pca(cfg.encoder.pca_file)
            if self.dist.is_main:
                print(f"feature statistics: ReDi PCA file {stats.source} ({stats.count} tokens, whiten="
                      f"{stats.whiten}, not applied)", flush=True)
            return stats
        if cfg.encoder.statistics:
            return FeatureStatistics.load(cfg.encoder.statistics)
        cached = self.out / "feature_stats.pt"
        made_from = self._statistics_source()
        if cached.is_file():
            reason = stale_cache_reason(cached, made_from)
            if reason is None:
                return FeatureStatistics.load(cached)
            if self.dist.is_main:
                print(f"feature statistics: recomputing {cached}: {reason}", flush=True)
        # A pass over the first batches of a separate, seeded order (does not move the training data position).
        from ..data import build_loader

        loader = build_loader(self.dataset, global_batch_size=cfg.data.global_batch_size, rank=self.dist.rank,
                              world_size=self.dist.world_size, seed=cfg.run.seed + 7919,
                              num_workers=cfg.data.num_workers, device=self.device, backend=cfg.data.loader)
        batches = loader
        if cfg.data.hflip:  # the statistics of the features training sees: of flipped images too
            batches = (dict(batch, image=self._hflip(batch["image"].to(self.device),
                                                     _step_generator(cfg.run.seed + 7919, i, self.device)))
                       for i, batch in enumerate(loader))
        stats = compute_feature_statistics(self.encoder, batches, self.encoder.embed_dim,
                                           min(cfg.encoder.statistics_batches, loader.steps_per_epoch))
        loader.close()
        stats = merge_statistics(stats)
        if self.dist.is_main:
            stats.save(cached)
            write_cache_source(cached, made_from)
            logger.info("feature statistics: %d tokens -> %s", int(stats.count), cached)
        return stats

    def _init_from(self) -> bool:
        """model.init_from on a fresh start (init_from.py); True when weights were loaded. A run that will resume its
        own checkpoint skips it here (`resume` says so)."""
        cfg = self.cfg
        if not cfg.model.init_from or not starts_fresh(cfg):
            return False
        try:
            line = init_from_checkpoint(cfg, self.denoiser, self.objective.projector)
        except ValueError as error:  # preflight checked it; the file changed since
            raise RunSetupError(str(error)) from None
        if self.dist.is_main:
            print(line, flush=True)
        return True

    def _statistics_source(self) -> dict:
        """What the feature statistics depend on: the data, the encoder and how many batches were read."""
        cfg = self.cfg
        data_path = str(Path(cfg.data.path).resolve()) if cfg.data.path else None
        return {"data.source": cfg.data.source, "data.path": data_path, "data.image_size": cfg.data.image_size,
                "data.channels": cfg.data.channels, "samples": len(self.dataset), "encoder.name": cfg.encoder.name,
                "encoder.weights": cfg.encoder.weights, "encoder.resolution": cfg.encoder.resolution,
                "encoder.dtype": cfg.encoder.dtype, "encoder.statistics_batches": cfg.encoder.statistics_batches,
                "data.global_batch_size": cfg.data.global_batch_size, "data.hflip": cfg.data.hflip}

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, ema: dict) -> dict:
        return {
            "model": self.denoiser.state_dict(),
            "ema": ema,
            "projector": self.objective.projector.state_dict(),
            "optimizer": self.engine.optimizer_state() if self.engine.kind != "deepspeed" else None,
            "rng": rng_state(),
            "data": self.loader.state_dict(),
            "counters": {"skipped_steps": self.skipped_steps},
            "feature_vis": self.feature_vis.state_dict() if self.feature_vis is not None else None,
            "config": self.cfg.to_dict(),
            "model_config": dict(self.denoiser.config),
        }

    def save(self) -> Optional[Path]:
        path = None
        if self.engine.kind == "deepspeed":  # ZeRO: each rank saves its optimizer partition
            part = self._partition_path(checkpoint_path(self.out, self.step), self.dist.rank)
            from .checkpoint import atomic_torch_save

            atomic_torch_save(self.engine.optimizer_state(), part)
        ema = self.ema.state_dict()  # every rank: under ZeRO with the fused EMA this gathers the shards
        barrier()
        if self.dist.is_main:
            path = save_checkpoint(self.out, self.step, self._payload(ema), keep_last=self.cfg.run.keep_checkpoints)
            if self.engine.kind == "deepspeed":
                for old in (self.out / "checkpoints").glob("step-*.optim-rank*.pt"):
                    if not (self.out / "checkpoints" / (old.name.split(".optim")[0] + ".pt")).exists():
                        old.unlink(missing_ok=True)
        barrier()
        return path

    def resume(self) -> None:
        """Continue from a checkpoint as run.resume says. `auto` walks back from the newest checkpoint to the newest
        one that loads (and, under DeepSpeed, has every rank's optimizer partition), setting aside the ones it skips
        as `*.damaged` with the reason; a folder with no checkpoint starts at step 0 as a fresh run would (its
        metrics from an earlier attempt are dropped). An explicit path must load."""
        r = self.cfg.run.resume
        if r == "none":
            return
        candidates = resume_candidates(self.out) if r == "auto" else [Path(r)]
        skipped, blob, path = [], None, None
        for path in candidates:
            try:
                blob = load_checkpoint(path, map_location="cpu")
                self._check_partitions(path)
                break
            except (ValueError, FileNotFoundError) as error:
                if r != "auto":
                    raise RunSetupError(f"run.resume={r}: {error}") from None
                skipped.append((path, str(error)))
                blob = None
        barrier()  # every rank has tried the same files before any is moved
        for bad, why in skipped:
            if self.dist.is_main:
                moved = set_aside(bad, why)
                print(f"resume: skipped {bad.name}: {why}; set aside as {moved.name}", flush=True)
        if blob is None:
            if candidates and self.cfg.model.init_from and not self.initialized_from:
                raise RunSetupError(f"run.resume=auto: no checkpoint in {self.out / 'checkpoints'} loads (set aside "
                                    f"as *.damaged), and model.init_from was not applied because the folder held "
                                    f"checkpoints: start again to begin a fresh run from model.init_from")
            self.metrics.truncate_after(0)  # a restart before the first checkpoint is the fresh run again
            if self.dist.is_main and candidates:
                print("resume: no checkpoint loads; starting at step 0", flush=True)
            return
        changes = check_resume_changes(blob.get("config"), self.cfg.to_dict(), path)
        self.denoiser.load_state_dict(blob["model"])
        self.ema.load_state_dict(blob["ema"])
        self.objective.projector.load_state_dict(blob["projector"])
        configured = configured_hyperparameters(self.engine.optimizer)
        if self.engine.kind == "deepspeed":
            part = self._partition_path(path, self.dist.rank)
            self.engine.load_optimizer_state(torch.load(part, map_location="cpu", weights_only=True))
        else:
            self.engine.load_optimizer_state(blob["optimizer"])
        keep_configured_hyperparameters(self.engine.optimizer, configured)  # optim.* given now take effect
        self.loader.load_state_dict(blob["data"])
        set_rng_state(blob["rng"])
        self.step = int(blob["step"])
        self.skipped_steps = int(blob["counters"]["skipped_steps"])
        self._resumed_feature_vis = blob.get("feature_vis")
        self.metrics.truncate_after(self.step)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
            if self.cfg.model.init_from:
                print(f"model.init_from ignored: the run continues from its own checkpoint ({path.name}), not from "
                      f"{self.cfg.model.init_from}", flush=True)
            for name, before, now in changes:
                print(f"resume: {name} {before!r} -> {now!r}", flush=True)

    def _checkpointed_now(self) -> bool:
        """True when the newest checkpoint is of the current step (nothing to save again)."""
        return latest_checkpoint(self.out) == checkpoint_path(self.out, self.step)

    @staticmethod
    def _partition_path(path: Path, rank: int) -> Path:
        return path.with_name(f"{path.stem}.optim-rank{rank}.pt")

    def _check_partitions(self, path: Path) -> None:
        """Under DeepSpeed a checkpoint is whole only with every rank's optimizer partition."""
        if self.engine.kind != "deepspeed":
            return
        missing = [r for r in range(self.dist.world_size) if not self._partition_path(path, r).is_file()]
        if missing:  # partitions are written before the checkpoint: a missing one means another world size
            raise RunSetupError(f"{path}: no DeepSpeed optimizer partition for rank(s) {missing}; resume with the "
                                f"number of processes that wrote it")

    # ------------------------------------------------------------------ one step

    def _hflip(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """This rank's images (b, C, H, W) with data.hflip's per-sample flips: one coin per sample of the global batch
        from `gen` (so the flips do not depend on the number of processes), this rank's slice applied."""
        start, stop = _rank_slice(self.dist, self.cfg.data.global_batch_size)
        return hflip_where(images, draw_hflip_mask(self.cfg.data.global_batch_size, gen, self.device)[start:stop])

    def _batch_inputs(self, batch: dict, gen: torch.Generator):
        """(x, features, y) for this rank; the flips and the posterior noise are drawn for the global batch and
        sliced."""
        cfg = self.cfg
        start, stop = _rank_slice(self.dist, cfg.data.global_batch_size)
        images = batch["image"].to(self.device, non_blocking=True)
        if cfg.data.hflip:  # first: the denoiser's pixels and the encoder's input are the same flipped images
            images = self._hflip(images, gen)
        if self.latent_space:
            from ..encoders.vae import sample_posterior

            moments = batch["moments"].to(self.device, non_blocking=True)
            c, h = self.image_channels, self.image_size
            eps = torch.randn((cfg.data.global_batch_size, c, h, h), device=self.device, generator=gen)[start:stop]
            x = sample_posterior(moments, layout=self.loader.moments_layout, scale=cfg.vae.scale, noise=eps)
        else:
            x = images.float() / 127.5 - 1.0
            if self.pixel_patch > 1:  # JiT: p x p pixel patches folded into channels on the token grid
                x = torch.nn.functional.pixel_unshuffle(x, self.pixel_patch)
        features = None
        if self.encoder is not None:
            with torch.no_grad(), nvtx_range("encoder"):
                features = self.encoder(images)
        return x, features, batch["label"].to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict:
        cfg = self.cfg
        gen = _step_generator(cfg.run.seed, self.step, self.device)
        x, features, y = self._batch_inputs(batch, gen)
        noise = self.objective.draw_noise(cfg.data.global_batch_size, device=self.device, generator=gen,
                                          label_dropout=cfg.model.class_dropout_prob)
        noise = noise.slice(*_rank_slice(self.dist, cfg.data.global_batch_size))
        if cfg.optim.warmup_steps:
            self.engine.set_lr_factor(min(1.0, (self.step + 1) / cfg.optim.warmup_steps))
        with nvtx_range("forward"):
            out = self.engine(x, features, y, noise)
        # One host sync per step: whether any rank's loss is non-finite (all skip the step) and whether any rank was
        # asked to stop (all stop after this step, see stop_signals.py).
        flags = torch.stack([(~torch.isfinite(out.loss.detach())).float(),
                             out.loss.new_full((), float(self.stop.requested))])  # a fill, not a host copy
        nonfinite, stop = all_reduce_max(flags).tolist()
        self.stop_agreed = stop > 0
        self.nonfinite_streak = self.nonfinite_streak + 1 if nonfinite > 0 else 0
        if nonfinite > 0:
            self.engine.skip_step()
            self.skipped_steps += 1
            if self.skipped_steps > cfg.run.max_skipped_steps:
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step}: {self.skipped_steps} steps skipped so far, more than "
                    f"run.max_skipped_steps={cfg.run.max_skipped_steps}. Lower optim.lr, enable gradient clipping "
                    f"(optim.grad_clip / DeepSpeed gradient_clipping) or check the data; the last good checkpoint "
                    f"is in {self.out / 'checkpoints'}")
            logs = dict(out.logs)
            logs["skipped"] = torch.tensor(1.0)
            return logs
        with nvtx_range("backward"):
            self.engine.backward(out.loss)
        decay = self._ema_decay()
        if self.fused_ema:  # the optimizer step updates the EMA with this step's decay
            self.ema.set_decay(decay)
        with nvtx_range("optimizer"):
            grad_norm = self.engine.step()
        with nvtx_range("ema"):
            self.ema.update(self.denoiser, decay)
        logs = dict(out.logs)
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        if out.z is not None:
            self._last_z = out.z
        return logs

    def _ema_decay(self) -> float:
        """optim.ema_decay, or with optim.ema_warmup the usual ramp min(decay, (1 + k) / (10 + k)) after k updates:
        a short run's EMA then forgets the zero-output initialization instead of staying mostly at it."""
        o = self.cfg.optim
        if not o.ema_warmup:
            return o.ema_decay
        return min(o.ema_decay, (1 + self.step) / (10 + self.step))

    # ------------------------------------------------------------------ pictures

    def _fixed_images(self, n: int):
        """The same n images at every snapshot (the first n of the data set), for the feature-space picture."""
        from ..data import decode_image_bytes

        images = []
        for i in range(min(n, len(self.dataset))):
            s = self.dataset.read(i)
            img = decode_image_bytes(s.image) if self.dataset.encoded else torch.from_numpy(s.image)
            images.append(img)
        return torch.stack(images)

    @torch.no_grad()
    def snapshot_features(self) -> None:
        from .visuals import FeatureEvolution

        if self.encoder is None:
            return
        images = self._fixed_images(self.cfg.run.feature_vis_images)
        if self.feature_vis is None:
            vis_images = images
            if self.latent_space is False and images.shape[1] == 1:
                vis_images = images.repeat(1, 3, 1, 1)
            self.feature_vis = FeatureEvolution(vis_images, self.out / "feature_evolution.png",
                                                upscale=max(1, 128 // images.shape[-1]))
            if getattr(self, "_resumed_feature_vis", None):
                self.feature_vis.load_state_dict(self._resumed_feature_vis)
        projector = self.objective.projector
        was_training = projector.training
        projector.eval()
        z = projector(self.encoder(images.to(self.device))).z
        projector.train(was_training)
        self.feature_vis.add(self.step, z.float().cpu())

    @torch.no_grad()
    def save_samples(self, ema: Optional[dict] = None) -> Path:
        """A grid from the EMA weights (`ema`: a state dict gathered beforehand on every rank, see `save`)."""
        from ..sampling import decode_to_uint8, generate
        from .visuals import save_image_grid

        s = self.cfg.sample
        model = build_denoiser(self.cfg, self.objective.model_channels, self.image_size, self.dataset.num_classes)
        model.load_state_dict(ema if ema is not None else self.ema.state_dict())
        model.to(self.device).eval()
        labels = torch.arange(s.num_images) % self.dataset.num_classes
        x = generate(model, labels.to(self.device), image_channels=self.image_channels,
                     feature_channels=self.objective.feature_channels, image_size=self.image_size,
                     sampler=s.sampler, method=s.method, steps=s.steps, cfg_scale=s.cfg_scale,
                     guidance_on=s.guidance_on, prediction=self.cfg.method.prediction,
                     generator=torch.Generator().manual_seed(self.cfg.run.seed), device=self.device)
        images = decode_to_uint8(x, self._decoder(), self.pixel_patch)
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        nrow = self.dataset.num_classes if s.num_images % self.dataset.num_classes == 0 else None
        save_image_grid(images.cpu(), path, nrow=nrow, upscale=max(1, 64 // images.shape[-1]))
        return path

    def _decoder(self):
        if not self.latent_space:
            return None
        if self._vae is None:
            from ..encoders import LatentVAE

            self._vae = LatentVAE(self.cfg.vae.weights, moments_layout=self.loader.moments_layout).to(self.device)
        return self._vae

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to run.steps, then write the final checkpoint, samples and pictures; returns what was written.
        Raises TrainingStopped after checkpointing when SIGTERM or SIGINT arrives (stop_signals.py)."""
        r = self.cfg.run
        profile = ProfilerWindow.parse(r.profile_steps, self.device)  # nsys --capture-range=cudaProfilerApi
        progress = None
        if self.dist.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=r.steps, initial=self.step, desc="train", dynamic_ncols=True, smoothing=0.05)
        data = iter(self.loader)
        self.stop.install()
        try:
            self._loop(data, profile, progress)
        finally:
            self.stop.restore()
        if profile:
            profile.close()
        if progress is not None:
            progress.close()
        return self.finish()

    def _loop(self, data, profile, progress) -> None:
        """Steps until run.steps: train, log at intervals, pictures, samples, checkpoints, and a stop if signalled."""
        cfg, r = self.cfg, self.cfg.run
        window_logs: dict = {}
        window_start, window_images = time.perf_counter(), 0
        while self.step < r.steps:
            if profile:
                profile.before_step(self.step)
            with nvtx_range("step"):
                with nvtx_range("data"):
                    try:
                        batch = next(data)
                    except StopIteration:  # next epoch
                        data = iter(self.loader)
                        batch = next(data)
                logs = self.train_step(batch)
            if "corrupt" in batch:  # samples the loader skipped (named in its warnings): counted, no host sync
                self.corrupt_samples = self.corrupt_samples + batch["corrupt"]
            self.step += 1
            window_images += cfg.data.global_batch_size
            for k, v in logs.items():
                window_logs.setdefault(k, []).append(v.detach().float())
            if profile:
                profile.after_step(self.step)

            if r.log_every and (self.step % r.log_every == 0 or self.step == r.steps):
                values = {k: torch.stack(v).mean() for k, v in window_logs.items()}
                values = {k: float(all_reduce_mean(v)) for k, v in values.items()}
                elapsed = time.perf_counter() - window_start
                values["img_per_s"] = window_images / max(elapsed, 1e-9)
                values["lr"] = self.engine.optimizer.param_groups[0]["lr"]
                values["skipped_steps"] = self.skipped_steps
                values["corrupt_samples"] = int(self.corrupt_samples)
                if self.objective.projector.config.mode == "learned" and getattr(self, "_last_z", None) is not None:
                    values.update({f"proj/{k}": v for k, v in self.objective.projector.diagnostics(
                        self._last_z).items()})
                self.metrics.log(self.step, values)
                if progress is not None:
                    shown = {k: f"{values[k]:.4f}" for k in ("loss", "loss_image", "loss_feature", "loss_reg")
                             if k in values}
                    shown["img/s"] = f"{values['img_per_s']:.0f}"
                    progress.set_postfix(shown, refresh=False)
                window_logs, window_start, window_images = {}, time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if r.feature_vis_every and (self.step % r.feature_vis_every == 0 or self.step == 1):
                if self.dist.is_main:
                    self.snapshot_features()
            if cfg.sample.every and self.step % cfg.sample.every == 0:
                ema = self.ema.state_dict()  # every rank (collective under ZeRO with the fused EMA)
                if self.dist.is_main:
                    self.save_samples(ema)
            self._checkpoint_due |= bool(r.ckpt_every and self.step % r.ckpt_every == 0)
            if self._checkpoint_due:
                self._periodic_checkpoint()
            if self.stop_agreed:
                self._stop(progress)

    def _periodic_checkpoint(self) -> None:
        """Save, unless the loss is non-finite right now: then put it off to the next good step, so the newest
        checkpoint is always a good one and pruning never drops the good ones for copies of a diverging run."""
        if self.nonfinite_streak:
            if self.dist.is_main:
                print(f"step {self.step}: checkpoint put off, the loss has been non-finite for {self.nonfinite_streak} "
                      f"step(s); the newest checkpoint stays the last good one", flush=True)
            return
        self.save()
        self._checkpoint_due = False

    def _stop(self, progress) -> None:
        """A stop signal reached some rank: checkpoint this step (unless just written) and end the run."""
        if progress is not None:
            progress.close()
        if not (self.nonfinite_streak or self._checkpointed_now()):
            self.save()
        path = latest_checkpoint(self.out)  # this step's; during a non-finite streak the last good one
        self.metrics.close()
        raise TrainingStopped(self.stop.signum or signal.SIGTERM, self.step, path)

    def finish(self) -> dict:
        """Final checkpoint, samples, feature picture and loss curves; returns (and prints) where they are."""
        written = {}
        if not self._checkpointed_now():
            self.save()
        ema = self.ema.state_dict()  # every rank (collective under ZeRO with the fused EMA)
        if self.dist.is_main:
            from .visuals import plot_loss_curves

            written["checkpoint"] = str(latest_checkpoint(self.out))
            if self.encoder is not None:
                if self.feature_vis is None or self.feature_vis.steps[-1] != self.step:
                    self.snapshot_features()
                written["feature_evolution"] = str(self.feature_vis.path)
            written["samples"] = str(self.save_samples(ema))
            self.metrics.close()
            if self.metrics.path.exists() and self.metrics.path.stat().st_size:
                written["loss_curves"] = str(plot_loss_curves(self.metrics.path, self.out / "loss_curves.png"))
            written["metrics"] = str(self.metrics.path)
            if self.metrics.tensorboard_dir is not None:
                written["tensorboard"] = str(self.metrics.tensorboard_dir)
            (self.out / "outputs.json").write_text(json.dumps(written, indent=2) + "\n")
            corrupt = int(self.corrupt_samples)
            stood_in = f", {corrupt} corrupt samples stood in for (see the warnings)" if corrupt else ""
            print(f"\nDone: {self.step} steps ({self.skipped_steps} skipped{stood_in}). Everything is in {self.out}/:")
            for key, path in written.items():
                print(f"  {key:18s} {path}")
        else:
            self.metrics.close()
        barrier()
        return written


def _describe_optimizer(optimizer) -> str:
    from ..optim import AdamWEMA

    if isinstance(optimizer, AdamWEMA):
        return f"AdamWEMA ({optimizer.backend} backend): AdamW and the fp32 EMA in one pass"
    return f"torch.optim.AdamW{' (fused)' if optimizer.defaults.get('fused') else ''} + a separate fp32 EMA update"


def run(cfg: TrainConfig, ds_config_path: Optional[str] = None, local_rank: Optional[int] = None) -> dict:
    """Train as configured; returns {what: path} of everything written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dist = setup_distributed(cfg.run.device, use_deepspeed=ds_config_path is not None, local_rank_arg=local_rank)
    folder = RunFolder(cfg.run.out_dir)
    try:
        torch.manual_seed(cfg.run.seed + dist.rank)
        ds_config = load_ds_config(ds_config_path, cfg, dist.world_size) if ds_config_path else None
        claim_run_folder(folder, cfg, dist)
        if dist.is_main:
            print(f"coredi_fast: {dist.launcher} on {dist.world_size} process(es), device {dist.device}; "
                  f"writing to {cfg.run.out_dir}", flush=True)
        trainer = Trainer(cfg, dist, ds_config)
        trainer.resume()
        if dist.is_main:  # only now: a resume refused above leaves the run's config.yaml as it was
            import yaml

            (Path(cfg.run.out_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            n = sum(p.numel() for p in trainer.denoiser.parameters())
            mode = cfg.method.projector.mode
            print(f"model {cfg.model.name}: {n / 1e6:.2f}M parameters, input {trainer.objective.model_channels}x"
                  f"{trainer.image_size}x{trainer.image_size} ({'latents' if trainer.latent_space else 'pixels'} + "
                  f"{trainer.objective.feature_channels} feature channels, projector mode {mode})", flush=True)
        return trainer.fit()
    finally:
        folder.unlock()
        cleanup_distributed()


def claim_run_folder(folder: RunFolder, cfg: TrainConfig, dist: DistInfo) -> None:
    """Rank 0 takes the folder's lock and readies it (see run_folder.py); every rank raises RunSetupError if it
    cannot, so no rank waits at a barrier for one that gave up."""
    error = None
    if dist.is_main:
        try:
            for message in (folder.lock(), folder.prepare(cfg.run.resume, cfg.run.overwrite)):
                if message:
                    print(f"coredi_fast: {message}", flush=True)
        except RunSetupError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise RunSetupError(error)
