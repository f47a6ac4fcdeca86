"""The training system end to end, as users launch it: `python train.py`, `torchrun train.py` (DDP) and
`deepspeed train.py --ds_config ...` (ZeRO-2), on CPU with gloo.

* 2-process DDP and DeepSpeed ZeRO-2 runs reproduce the 1-process loss sequence for the same global batch;
* a run stopped after k steps and resumed matches an uninterrupted run (losses, weights, EMA);
* the embedded demo runs end to end (shortened) and writes everything it promises;
* non-finite losses are skipped and counted, and the run stops with a clear message when they persist;
* bad configs fail at start-up naming the field, before anything is written.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast configuration: SiT-Micro on 16x16 digits, global batch 8, fp32 so runs compare tightly.
TINY = ["model.name=SiT-Micro/2", "data.global_batch_size=8", "run.precision=fp32", "run.log_every=1",
        "sample.every=0", "sample.num_images=10", "sample.steps=2", "sample.method=euler", "run.feature_vis_every=0",
        "run.ckpt_every=0", "encoder.statistics_batches=4", "run.tensorboard=false", "method.projector.regularizer=cov"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TORCH_CPP_LOG_LEVEL="ERROR")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args, timeout=600):
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(args)}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(out, *overrides, launcher=None, nproc=1, ds_config=None):
    cmd = [sys.executable, "train.py"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py"]
    elif launcher == "deepspeed":
        launcher_path = Path(sys.executable).with_name("deepspeed")  # the venv's, even when it is not activated
        cmd = [str(launcher_path) if launcher_path.exists() else shutil.which("deepspeed"), "--num_gpus", str(nproc), "--master_port",
               str(_free_port()), "train.py"]
    if ds_config:
        cmd += ["--ds_config", str(ds_config)]
    return _run(cmd + [f"run.out_dir={out}", *TINY, *overrides])


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in rows], dtype=torch.float64), [r["step"] for r in rows]


def final_checkpoint(out):
    folder = Path(out) / "checkpoints"
    return torch.load(folder / (folder / "latest.txt").read_text().strip(), weights_only=True)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(out, "run.steps=6")
    return out


@pytest.mark.distributed
def test_ddp_two_processes_reproduce_the_single_process_losses(single_run, tmp_path):
    train(tmp_path, "run.steps=6", launcher="torchrun", nproc=2)
    ref, steps = losses(single_run)
    got, got_steps = losses(tmp_path)
    assert steps == got_steps == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    a, b = final_checkpoint(single_run), final_checkpoint(tmp_path)
    for key in ("model", "ema", "projector"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name].double(), a[key][name].double(), rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero2_two_processes_reproduce_the_single_process_losses(single_run, tmp_path):
    pytest.importorskip("deepspeed")
    ds = json.loads((ROOT / "ds_zero2.json").read_text())
    ds["gradient_clipping"] = 0.0  # the single-process reference trains without clipping, as ReDi does
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds))
    # 3 steps, stop, then resume to 6: also exercises loading each rank's ZeRO optimizer partition.
    train(tmp_path / "run", "run.steps=3", launcher="deepspeed", nproc=2, ds_config=config)
    proc = train(tmp_path / "run", "run.steps=6", launcher="deepspeed", nproc=2, ds_config=config)
    assert "resumed from" in proc.stdout
    ref, _ = losses(single_run)
    got, steps = losses(tmp_path / "run")
    assert steps == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("*.optim-rank*.pt")) == [
        f"step-000000{s}.optim-rank{r}.pt" for s in (3, 6) for r in (0, 1)]  # one partition per rank per checkpoint


def test_resumed_run_matches_an_uninterrupted_run(single_run, tmp_path):
    train(tmp_path, "run.steps=3")                 # stops after 3 steps (final checkpoint at 3)
    proc = train(tmp_path, "run.steps=6")          # resume=auto picks it up
    assert "resumed from" in proc.stdout and "step 3" in proc.stdout
    ref, _ = losses(single_run)
    got, steps = losses(tmp_path)
    assert steps == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)   # same process count: bit-identical
    a, b = final_checkpoint(single_run), final_checkpoint(tmp_path)
    for key in ("model", "ema", "projector"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=0, atol=0)
    assert b["data"] == a["data"]


def test_demo_runs_end_to_end_and_writes_everything(tmp_path):
    # The embedded default (`python train.py`), shortened: every output kind is produced.
    proc = _run([sys.executable, "train.py", f"run.out_dir={tmp_path}", "run.steps=20", "run.log_every=5",
                 "sample.every=10", "sample.steps=4", "run.feature_vis_every=10", "run.ckpt_every=10"])
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    for key in ("checkpoint", "samples", "feature_evolution", "loss_curves", "metrics"):
        assert Path(outputs[key]).is_file(), key
    assert "Done: 20 steps" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {"loss", "loss_image", "loss_feature", "loss_reg", "img_per_s", "proj/effective_rank"} <= set(rows[-1])
    for name in ("step-0000010.png", "step-0000020.png"):
        assert (tmp_path / "samples" / name).is_file()
    ckpt = final_checkpoint(tmp_path)
    from coredi_fast.models import create_model

    model = create_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["ema"], strict=True)  # the EMA has the public SiT names


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    # An absurd learning rate makes the loss overflow; the run skips, counts, then stops with advice.
    proc = subprocess.run([sys.executable, "train.py", f"run.out_dir={tmp_path}", *TINY, "run.steps=200",
                           "optim.lr=1e30", "run.max_skipped_steps=4", "run.ckpt_every=1", "run.keep_checkpoints=2"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "run.max_skipped_steps=4" in proc.stderr and "non-finite loss" in proc.stderr
    assert "Traceback" not in proc.stderr
    # No checkpoint during the streak: every one left is of a step whose loss was finite, and the newest is the
    # last such step (pruning kept the good ones).
    rows = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    logged = {row["step"]: row["loss"] for row in rows}
    good = [step for step, loss in logged.items() if isinstance(loss, float)]
    saved = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert saved and saved[-1] == good[-1] and len(good) < len(logged)
    assert "checkpoint put off, the loss has been non-finite" in proc.stdout


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1", "optim.lr"),
    ("data.source=imagenet", "data.source"),
    ("method.projector.dim=100", "method.projector"),
    ("model.name=SiT-Huge/2", "SiT-Huge/2"),
    ("run.stepz=3", "run.stepz"),
    # The file-dependent ones (preflight.py): they came as tracebacks after the run folder existed.
    (("data.source=shards", "data.path=/no/such/folder"), "data.path does not exist: /no/such/folder"),
    ("run.resume=/no/such.pt", "run.resume: checkpoint not found: /no/such.pt"),
    ("model.overrides={depthh: 3}", "model.overrides: create_model() got unknown argument(s) ['depthh']"),
    ("model.overrides={depth: -1}", "model.overrides: depth must be >= 1"),
    ("data.image_size=15", "encoder grid vs image grid"),
    ("method.projector.feature_dim=65", "method.projector.feature_dim=65 but encoder 'digits' gives 64-d tokens"),
    ("sample.cfg_scale=-1", "sample.cfg_scale must be >= 0"),
])
def test_bad_config_fails_at_start_up_naming_the_field(tmp_path, override, field):
    overrides = override if isinstance(override, tuple) else (override,)
    proc = subprocess.run([sys.executable, "train.py", f"run.out_dir={tmp_path / 'out'}", *overrides], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert field in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr  # one line
    assert not (tmp_path / "out").exists()  # failed before the run folder was written


@pytest.mark.parametrize("suffix, text, message", [
    (".yaml", "data:\n  image_size: [16\n", "invalid YAML at line 3, column 1"),
    (".json", '{"data": {\n', "invalid JSON at line 2, column 1"),
])
def test_a_config_file_with_a_syntax_error_is_named_with_the_line(tmp_path, suffix, text, message):
    config = tmp_path / f"bad{suffix}"
    config.write_text(text)
    proc = subprocess.run([sys.executable, "train.py", "--config", str(config), f"run.out_dir={tmp_path / 'out'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"{config}: {message}" in proc.stderr and "Traceback" not in proc.stderr


def test_dali_asked_for_without_dali_is_a_start_up_error(monkeypatch):
    from coredi_fast.data import dali_loader
    from coredi_fast.training.config import load_config
    from coredi_fast.training.preflight import preflight

    monkeypatch.setattr(dali_loader, "dali_available", lambda: False)
    with pytest.raises(ValueError, match="data.loader=dali but nvidia.dali is not installed"):
        preflight(load_config(None, ["data.loader=dali"]))


def test_fused_ops_train_the_same_as_plain_pytorch(single_run, tmp_path):
    # patch_dit + the fused joint embedding (their PyTorch backends on CPU): the same loss sequence and weights.
    train(tmp_path, "run.steps=6", "model.fused_ops=on")
    ref, _ = losses(single_run)
    got, _ = losses(tmp_path)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    a, b = final_checkpoint(single_run), final_checkpoint(tmp_path)
    assert a["model"].keys() == b["model"].keys()  # patching leaves the state dict (public SiT names) alone
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-5)


def test_fused_ema_trains_the_same_as_the_separate_ema(tmp_path):
    # optim.fused_ema=on: AdamWEMA (the native CPU op when built, which CI requires) updates the EMA inside the
    # optimizer pass; off: torch AdamW + the separate EMA. Same losses, weights and checkpoint "ema" entry (public
    # SiT names, warm-up decay included), so resume and sampling do not see the difference.
    from coredi_fast.optim import native

    fused = train(tmp_path / "on", "run.steps=6", "optim.fused_ema=on")
    train(tmp_path / "off", "run.steps=6", "optim.fused_ema=off")
    backend = "native" if native.is_available("cpu") else "torch"
    assert f"AdamWEMA ({backend} backend)" in fused.stdout
    ref, _ = losses(tmp_path / "off")
    got, _ = losses(tmp_path / "on")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    a, b = final_checkpoint(tmp_path / "off"), final_checkpoint(tmp_path / "on")
    for key in ("model", "ema", "projector"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert b[key][name].dtype == a[key][name].dtype, (key, name)
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    assert b["optimizer"]["state"] and all("ema" not in s for s in b["optimizer"]["state"].values())  # saved once


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero2_fused_ema_is_sharded_gathered_and_restored(single_run, tmp_path):
    # ZeRO-2 hands AdamWEMA each rank's half of the flat fp32 parameters, so each rank holds half of the EMA. The
    # checkpoint's "ema" entry gathers the halves (step 3); the resumed run scatters it back into the halves; the
    # final gathered EMA equals the single-process run's.
    pytest.importorskip("deepspeed")
    ds = json.loads((ROOT / "ds_zero2.json").read_text())
    ds["gradient_clipping"] = 0.0
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds))
    first = train(tmp_path / "run", "run.steps=3", "optim.fused_ema=on", launcher="deepspeed", nproc=2,
                  ds_config=config)
    assert "AdamWEMA" in first.stdout
    proc = train(tmp_path / "run", "run.steps=6", "optim.fused_ema=on", launcher="deepspeed", nproc=2,
                 ds_config=config)
    assert "resumed from" in proc.stdout
    ref, _ = losses(single_run)
    got, _ = losses(tmp_path / "run")
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    a, b = final_checkpoint(single_run), final_checkpoint(tmp_path / "run")
    assert a["ema"].keys() == b["ema"].keys()
    for name in a["ema"]:
        torch.testing.assert_close(b["ema"][name], a["ema"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_pixel_space_jit_trains_samples_and_resumes(tmp_path):
    """A JiT model through the same commands: patchified pixels, features on the token grid, x-prediction."""
    jit = ["--config", "configs/demo_digits_jit.yaml", "model.name=JiT-Micro/2"]
    _run([sys.executable, "train.py", *jit, f"run.out_dir={tmp_path}", *TINY[1:], "run.steps=4"])
    proc = _run([sys.executable, "train.py", *jit, f"run.out_dir={tmp_path}", *TINY[1:], "run.steps=6"])
    assert "resumed from" in proc.stdout and "JiT-Micro/2" in proc.stdout
    ckpt = final_checkpoint(tmp_path)
    assert ckpt["model_config"]["name"] == "JiT-Micro/2" and ckpt["model_config"]["feature_channels"] == 4
    out = tmp_path / "sampled"
    _run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "checkpoints" / "step-0000006.pt"),
          "--num-samples", "6", "--sampler", "ode", "--steps", "3", "--out", str(out)])
    import numpy as np

    arrays = np.load(out / "samples.npz")
    assert arrays["arr_0"].shape == (6, 16, 16, 3) and arrays["arr_0"].dtype == np.uint8
