"""data.hflip: per-sample random horizontal flips, as JiT trains (ReDi: none), seen by the denoiser and the encoder.

References: `torch.flip` applied sample by sample in a Python loop; the encoder run on a manually flipped image;
the mask drawn again from the same (seed, step) generator; the 1-process global mask sliced by rank.
"""
import pytest
import torch

from coredi_fast.data.flip import check_hflip, draw_hflip_mask, hflip_where
from coredi_fast.training.config import load_config
from coredi_fast.training.distributed import DistInfo
from coredi_fast.training.loop import Trainer, _step_generator
from coredi_fast.training.preflight import preflight

CPU = torch.device("cpu")
GLOBAL_BATCH = 8


def _reference_flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.flip(img, dims=[-1]) if bool(m) else img for img, m in zip(images, mask)])


def test_exactly_the_sampled_samples_are_mirrored():
    images = torch.randint(0, 256, (16, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mask = draw_hflip_mask(16, torch.Generator().manual_seed(11), CPU)
    assert mask.dtype == torch.bool and 0 < int(mask.sum()) < 16  # both kinds occur in this draw
    out = hflip_where(images, mask)
    assert out.dtype == torch.uint8 and torch.equal(out, _reference_flip(images, mask))
    assert torch.equal(out[~mask], images[~mask])  # the others are untouched
    assert not torch.equal(out[mask], images[mask])
    with pytest.raises(ValueError, match="mask"):
        hflip_where(images, mask[:3])


def test_the_mask_is_reproducible_from_the_seed_and_fair():
    a = draw_hflip_mask(GLOBAL_BATCH, _step_generator(0, 5, CPU), CPU)
    assert torch.equal(a, draw_hflip_mask(GLOBAL_BATCH, _step_generator(0, 5, CPU), CPU))
    masks = torch.stack([draw_hflip_mask(GLOBAL_BATCH, _step_generator(0, s, CPU), CPU) for s in range(500)])
    assert (masks[1:] == masks[:-1]).all(dim=1).float().mean() < 0.02  # a new draw each step (repeats: 1/256)
    assert abs(masks.float().mean().item() - 0.5) < 0.03  # p = 1/2 (4000 coins: 3 sigma is 0.024)


def _trainer(tmp_path, *overrides, rank=0, world_size=1) -> Trainer:
    cfg = load_config("configs/demo_digits_jit.yaml", [
        "model.name=JiT-Micro/2", f"data.global_batch_size={GLOBAL_BATCH}", "run.precision=fp32",
        "encoder.statistics_batches=2", "run.tensorboard=false", f"run.out_dir={tmp_path}", *overrides])
    return Trainer(cfg, DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=CPU, launcher="single"))


def _pixels(trainer: Trainer, images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1.0  # the digits demo's pixel scaling, then JiT's patch folding
    return torch.nn.functional.pixel_unshuffle(x, trainer.pixel_patch)


def test_the_denoiser_and_the_encoder_both_see_the_flipped_images(tmp_path):
    trainer = _trainer(tmp_path / "on", "data.hflip=true")
    batch = next(iter(trainer.loader))
    images = batch["image"]
    step = 5
    x, features, _ = trainer._batch_inputs(batch, _step_generator(trainer.cfg.run.seed, step, CPU))
    mask = draw_hflip_mask(GLOBAL_BATCH, _step_generator(trainer.cfg.run.seed, step, CPU), CPU)
    assert 0 < int(mask.sum()) < GLOBAL_BATCH
    flipped = _reference_flip(images, mask)
    assert torch.equal(x, _pixels(trainer, flipped))
    for i in range(GLOBAL_BATCH):  # the encoder on each image, mirrored by hand where the coin said so
        one = torch.flip(images[i:i + 1], dims=[-1]) if mask[i] else images[i:i + 1]
        torch.testing.assert_close(features[i:i + 1], trainer.encoder(one), rtol=1e-5, atol=1e-5)
    plain = trainer.encoder(images)
    assert (features[mask] - plain[mask]).abs().max() > 1e-2  # the features really are of other images
    torch.testing.assert_close(features[~mask], plain[~mask], rtol=1e-5, atol=1e-5)


def test_off_leaves_the_images_alone(tmp_path):
    trainer = _trainer(tmp_path / "off")
    batch = next(iter(trainer.loader))
    x, features, _ = trainer._batch_inputs(batch, _step_generator(trainer.cfg.run.seed, 5, CPU))
    assert torch.equal(x, _pixels(trainer, batch["image"]))
    assert torch.equal(features, trainer.encoder(batch["image"]))


def test_each_rank_flips_its_slice_of_the_one_process_mask(tmp_path):
    # Rank 1 of 2 holds samples 4..7 of the global batch: its coins are the global coins 4..7.
    trainer = _trainer(tmp_path / "rank1", "data.hflip=true", rank=1, world_size=2)
    batch = next(iter(trainer.loader))
    assert batch["image"].shape[0] == GLOBAL_BATCH // 2
    got = trainer._hflip(batch["image"], _step_generator(0, 3, CPU))
    mask = draw_hflip_mask(GLOBAL_BATCH, _step_generator(0, 3, CPU), CPU)[GLOBAL_BATCH // 2:]
    assert torch.equal(got, _reference_flip(batch["image"], mask))


def test_flips_with_stored_latents_are_refused_at_start_up(tmp_path):
    from coredi_fast.data import ShardedImageDataset, write_digits_image_folder
    from coredi_fast.data.preprocess import preprocess_folder

    folder = write_digits_image_folder(tmp_path / "digits", image_size=16, split="test")

    def moments(images):  # stand-in VAE moments (4 mean + 4 logvar channels on a 4x4 grid)
        p = torch.nn.functional.avg_pool2d(images.float(), 4) / 255.0
        return torch.cat([p, p[:, :1], -p, -p[:, :1]], dim=1)

    out = tmp_path / "shards"
    preprocess_folder(folder, out, image_size=16, moments_fn=moments, vae_info={"weights": "t"}, shard_size=64,
                      limit=20, progress=False)
    assert ShardedImageDataset(out).has_moments
    cfg = load_config(None, ["data.source=shards", f"data.path={out}", "data.hflip=true", "method.projector.mode=none"])
    with pytest.raises(ValueError, match=rf"data.hflip=true, but {out} stores VAE latents of the unflipped images"):
        preflight(cfg)
    check_hflip(False, True, out)  # off: fine
    check_hflip(True, False, out)  # pixels: fine



JIT = ["model.name=JiT-Micro/2"]  # configs/demo_digits_jit.yaml's model, smaller


def _train_jit(out, *overrides, nproc=1):
    import sys

    from test_training import TINY, _run

    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return _run([sys.executable, *launcher, "train.py", "--config", "configs/demo_digits_jit.yaml",
                 f"run.out_dir={out}", *TINY, *JIT, *overrides])


def test_a_run_with_flips_resumes_bit_for_bit(tmp_path):
    from test_training import final_checkpoint, losses

    _train_jit(tmp_path / "whole", "data.hflip=true", "run.steps=6")
    _train_jit(tmp_path / "split", "data.hflip=true", "run.steps=3")
    _train_jit(tmp_path / "split", "data.hflip=true", "run.steps=6")
    _train_jit(tmp_path / "plain", "run.steps=6")
    want, _ = losses(tmp_path / "whole")
    got, steps = losses(tmp_path / "split")
    assert steps == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    unflipped, _ = losses(tmp_path / "plain")
    assert not torch.equal(unflipped, want)  # the flips changed the run
    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "split")
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=0)


@pytest.mark.distributed
def test_two_processes_flip_the_same_samples_as_one(tmp_path):
    from test_training import losses

    _train_jit(tmp_path / "one", "data.hflip=true", "run.steps=4")
    _train_jit(tmp_path / "two", "data.hflip=true", "run.steps=4", nproc=2)
    want, _ = losses(tmp_path / "one")
    got, _ = losses(tmp_path / "two")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
