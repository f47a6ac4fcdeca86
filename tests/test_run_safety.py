"""Nothing lost: interrupted, restarted and misconfigured runs, tried the way users and schedulers do it.

Every test runs `train.py` as a subprocess (the behaviour is the CLI's: signals, kills, restarts, exit statuses) on
the tiny digits configuration of test_training.py, and compares `metrics.jsonl` and the final weights with an
uninterrupted run bit for bit where a run is continued.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coredi_fast.training.checkpoint import save_checkpoint
from coredi_fast.training.stop_signals import StopRequest
from test_training import ROOT, TINY, _env, _free_port, final_checkpoint, losses, train

STEPS = 12


def start(out, *overrides) -> subprocess.Popen:
    """train.py in the background (its own session, so a signal reaches it alone)."""
    return subprocess.Popen([sys.executable, "train.py", f"run.out_dir={out}", *TINY, *overrides], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run_cli(out, *overrides, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", f"run.out_dir={out}", *TINY, *overrides], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout=300) -> None:
    """Until metrics.jsonl has n lines (the run is inside its training loop)."""
    metrics = Path(out) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} logged steps in {timeout} s")


def assert_same_run(out, reference) -> None:
    got, steps = losses(out)
    want, want_steps = losses(reference)
    assert steps == want_steps == list(range(1, STEPS + 1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    a, b = final_checkpoint(reference), final_checkpoint(out)
    for key in ("model", "ema", "projector"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=0, atol=0, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("reference")
    train(out, f"run.steps={STEPS}")
    return out


# ----------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_step_and_the_run_continues_bit_for_bit(reference, tmp_path, sig):
    proc = start(tmp_path, f"run.steps={STEPS}", "run.ckpt_every=0")  # no checkpoint but the one the signal asks
    wait_for_steps(tmp_path, proc, 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name} after step" in stderr
    stopped_at = int(stderr.split("after step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS
    assert (tmp_path / "checkpoints" / f"step-{stopped_at:07d}.pt").is_file()
    proc = run_cli(tmp_path, f"run.steps={STEPS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and f"at step {stopped_at}" in proc.stdout
    assert_same_run(tmp_path, reference)


def test_a_second_signal_exits_at_once_but_a_sigterm_delivered_twice_is_one_request(monkeypatch):
    from coredi_fast.training import stop_signals

    request = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.signum == signal.SIGTERM  # the first: a flag only
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwarding the scheduler's: still the same request
        assert request.requested
        monkeypatch.setattr(stop_signals, "REPEAT_WINDOW_S", 0.0)  # later on, a second SIGTERM is a second request
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exit_info.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    finally:
        request.restore()
    request = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit) as exit_info:  # Ctrl-C twice: at once, however soon
            os.kill(os.getpid(), signal.SIGINT)
        assert exit_info.value.code == 128 + signal.SIGINT
    finally:
        request.restore()


# ----------------------------------------------------------------------------------------------- restarts


def test_a_restart_after_a_kill_before_the_first_checkpoint_is_the_same_run(reference, tmp_path):
    proc = start(tmp_path, f"run.steps={STEPS}", "run.ckpt_every=0")
    wait_for_steps(tmp_path, proc, 4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not list((tmp_path / "checkpoints").glob("step-*.pt"))
    assert (tmp_path / "feature_stats.pt").is_file()  # the restart reads the cache the first attempt wrote
    proc = run_cli(tmp_path, f"run.steps={STEPS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path, reference)  # no step logged twice; same initial weights with the cache


def test_resume_walks_back_past_a_damaged_checkpoint(reference, tmp_path):
    run_cli(tmp_path, "run.steps=8", "run.ckpt_every=4", "run.keep_checkpoints=3")
    damaged = tmp_path / "checkpoints" / "step-0000008.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a truncated file (disk full, a copy cut short)
    proc = run_cli(tmp_path, f"run.steps={STEPS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped step-0000008.pt" in proc.stdout and "at step 4" in proc.stdout
    assert (tmp_path / "checkpoints" / "step-0000008.pt.damaged").is_file()  # kept for a look, out of the way
    assert_same_run(tmp_path, reference)


def test_overrides_given_on_resume_take_effect_and_fixed_fields_are_refused(tmp_path):
    run_cli(tmp_path, "run.steps=4", "optim.warmup_steps=0")
    proc = run_cli(tmp_path, "run.steps=6", "optim.warmup_steps=0", "optim.lr=0.0002")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: optim.lr 0.001 -> 0.0002" in proc.stdout
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged] == [0.001] * 4 + [0.0002] * 2
    config = (tmp_path / "config.yaml").read_text()
    proc = run_cli(tmp_path, "run.steps=8", "optim.warmup_steps=0", "model.name=SiT-S/2")
    assert proc.returncode == 2
    assert "different model.name (model.name: 'SiT-Micro/2' in the checkpoint, 'SiT-S/2' now)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "config.yaml").read_text() == config  # the refused invocation changed nothing


# ----------------------------------------------------------------------------------------------- the folder


def test_a_new_run_in_a_used_folder_is_refused_or_moves_the_old_one_aside(tmp_path):
    run_cli(tmp_path, "run.steps=8", "run.ckpt_every=2", "run.keep_checkpoints=3")
    old = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").glob("step-*.pt")}
    assert sorted(old) == ["step-0000004.pt", "step-0000006.pt", "step-0000008.pt"]
    proc = run_cli(tmp_path, "run.steps=2", "run.resume=none")
    assert proc.returncode == 2 and "holds a run (checkpoints up to step 8)" in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").glob("step-*.pt")} == old  # untouched

    proc = run_cli(tmp_path, "run.steps=2", "run.resume=none", "run.overwrite=true", "run.ckpt_every=1",
                   "run.keep_checkpoints=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (moved,) = list((tmp_path / "replaced").iterdir())
    assert {p.name: p.read_bytes() for p in (moved / "checkpoints").glob("step-*.pt")} == old  # nothing lost
    moved_steps = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert moved_steps == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")) == ["step-0000001.pt",
                                                                                   "step-0000002.pt"]
    assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == "step-0000002.pt"
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_second_run_on_a_live_folder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    first = start(tmp_path, "run.steps=100000")
    try:
        wait_for_steps(tmp_path, first, 1)
        proc = run_cli(tmp_path, "run.steps=2", timeout=300)
        assert proc.returncode == 2
        assert f"is in use by another run: pid {first.pid}" in proc.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
    proc = run_cli(tmp_path, "run.steps=2", "run.resume=none", "run.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the lock of a run that ended without releasing it (pid {first.pid}" in proc.stdout


def test_pruning_never_deletes_the_checkpoint_just_written_or_newer_ones(tmp_path):
    for step in (8, 12, 16):  # files that sort after the new run's first checkpoint
        save_checkpoint(tmp_path, step, {"x": torch.zeros(1)})
    save_checkpoint(tmp_path, 4, {"x": torch.zeros(1)}, keep_last=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")) == [
        "step-0000004.pt", "step-0000008.pt", "step-0000012.pt", "step-0000016.pt"]
    save_checkpoint(tmp_path, 20, {"x": torch.zeros(1)}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")) == [
        "step-0000016.pt", "step-0000020.pt"]


def test_feature_statistics_cache_is_recomputed_when_its_inputs_differ(tmp_path):
    run_cli(tmp_path, "run.steps=2")
    record = json.loads((tmp_path / "feature_stats.pt.source.json").read_text())
    assert record["encoder.statistics_batches"] == 4 and record["data.source"] == "digits"
    proc = run_cli(tmp_path, "run.steps=2", "run.resume=none", "run.overwrite=true")  # same inputs: reused
    assert proc.returncode == 0 and "recomputing" not in proc.stdout
    proc = run_cli(tmp_path, "run.steps=2", "run.resume=none", "run.overwrite=true", "encoder.statistics_batches=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recomputing" in proc.stdout and "encoder.statistics_batches 4 -> 3" in proc.stdout


def test_a_cache_without_a_record_of_its_inputs_is_not_trusted(tmp_path):
    from coredi_fast.training.cache_source import stale_cache_reason, write_cache_source

    cached = tmp_path / "stats.pt"
    cached.write_bytes(b"x")
    assert "no readable record" in stale_cache_reason(cached, {"a": 1})
    write_cache_source(cached, {"a": 1, "b": "x"})
    assert stale_cache_reason(cached, {"a": 1, "b": "x"}) is None
    assert stale_cache_reason(cached, {"a": 2, "b": "x"}) == "computed from other inputs: a 1 -> 2"


@pytest.mark.distributed
def test_sigterm_to_torchrun_checkpoints_every_rank_at_one_step_and_the_run_continues(reference, tmp_path):
    # torchrun forwards SIGTERM to its workers; the ranks agree on the step in the step's all-reduce, save together
    # and exit; the same command continues the run (2 processes reproduce 1 to float tolerance, test_training.py).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"run.out_dir={tmp_path}", *TINY, f"run.steps={STEPS}", "run.ckpt_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_steps(tmp_path, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert stderr.count("stopped by SIGTERM after step") == 2, stderr[-3000:]  # both ranks, one step
    steps = {int(part.split(";")[0]) for part in stderr.split("stopped by SIGTERM after step ")[1:]}
    (stopped_at,) = steps
    assert (tmp_path / "checkpoints" / f"step-{stopped_at:07d}.pt").is_file()
    train(tmp_path, f"run.steps={STEPS}", launcher="torchrun", nproc=2)
    got, logged = losses(tmp_path)
    want, _ = losses(reference)
    assert logged == list(range(1, STEPS + 1))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_a_deepspeed_job_saves_every_ranks_partition(tmp_path):
    pytest.importorskip("deepspeed")
    ds = json.loads((ROOT / "ds_zero2.json").read_text())
    ds["gradient_clipping"] = 0.0
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds))
    launcher = Path(sys.executable).with_name("deepspeed")
    out = tmp_path / "run"
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "train.py", "--ds_config",
           str(config), f"run.out_dir={out}", *TINY, f"run.steps={STEPS}", "run.ckpt_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_steps(out, proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job (the launchers forward too)
    _, stderr = proc.communicate(timeout=300)
    stopped = {int(part.split(";")[0]) for part in stderr.split("stopped by SIGTERM after step ")[1:]}
    assert len(stopped) == 1, stderr[-3000:]
    (step,) = stopped
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.glob(f"step-{step:07d}*")) == [
        f"step-{step:07d}.optim-rank0.pt", f"step-{step:07d}.optim-rank1.pt", f"step-{step:07d}.pt"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {step}" in proc.stdout
