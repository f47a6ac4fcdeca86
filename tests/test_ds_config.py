"""optim.grad_clip is the one source of truth for gradient clipping, whatever the launcher.

* the shipped ds_zero2.json states the clipping every shipped recipe trains with (none, as ReDi's train_redi.py:
  no clip_grad_norm_ call);
* a user's json whose "gradient_clipping" disagrees with the config is a one-line start-up error naming the file,
  the key and both values, before the run folder exists;
* a json without the key (or "auto") gets the config's value, so DeepSpeed does not fall back to its silent 1.0;
* a 2-process DeepSpeed run clipping by the config reproduces the 1-process run with the same clip (and differs from
  an unclipped one, so the clip really acted).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coredi_fast.training.config import load_config
from coredi_fast.training.ds_config import load_ds_config, read_ds_config, reconcile_gradient_clipping
from coredi_fast.training.preflight import preflight
from test_training import ROOT, _env, losses, train

SHIPPED_JSON = ROOT / "ds_zero2.json"
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _json_with(tmp_path, **changes) -> Path:
    ds = json.loads(SHIPPED_JSON.read_text())
    for key, value in changes.items():
        if value is None:
            ds.pop(key, None)
        else:
            ds[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_the_shipped_json_clips_as_every_shipped_recipe_does(recipe):
    cfg = load_config(str(recipe))
    assert json.loads(SHIPPED_JSON.read_text())["gradient_clipping"] == cfg.optim.grad_clip == 0.0
    ds = reconcile_gradient_clipping(read_ds_config(str(SHIPPED_JSON)), str(SHIPPED_JSON), cfg)
    assert ds["gradient_clipping"] == 0.0


def test_a_json_that_disagrees_with_the_config_fails_at_start_up_naming_both(tmp_path):
    bad = _json_with(tmp_path, gradient_clipping=1.0)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train.py", "--ds_config", str(bad), f"run.out_dir={out}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f'{bad}: "gradient_clipping": 1.0 disagrees with optim.grad_clip=0.0' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written
    # The other way round, through the preflight function: the config's clip against a json without clipping.
    cfg = load_config(None, ["optim.grad_clip=0.5"])
    with pytest.raises(ValueError, match=r'"gradient_clipping": 0.0 disagrees with optim.grad_clip=0.5'):
        preflight(cfg, str(_json_with(tmp_path, gradient_clipping=0.0)))
    preflight(cfg, str(_json_with(tmp_path, gradient_clipping=0.5)))  # agreeing: fine


@pytest.mark.parametrize("given", [None, "auto"])
def test_a_json_without_gradient_clipping_gets_the_configs(tmp_path, given):
    path = _json_with(tmp_path, gradient_clipping=given)
    cfg = load_config(None, ["optim.grad_clip=0.25"])
    ds = load_ds_config(str(path), cfg, world_size=2)
    assert ds["gradient_clipping"] == 0.25
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32


def test_a_json_with_a_clip_that_is_not_a_number_or_not_json_is_named(tmp_path):
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match=r'"gradient_clipping" must be a number, got \'one\''):
        preflight(cfg, str(_json_with(tmp_path, gradient_clipping="one")))
    broken = tmp_path / "broken.json"
    broken.write_text('{"gradient_clipping": ')
    with pytest.raises(ValueError, match=rf"{broken}: invalid JSON at line 1"):
        preflight(cfg, str(broken))
    with pytest.raises(ValueError, match="--ds_config: file not found"):
        preflight(cfg, str(tmp_path / "missing.json"))


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_clips_with_the_configs_value_as_the_single_process_run_does(tmp_path):
    pytest.importorskip("deepspeed")
    # The demo's gradient norms are ~2-4, so a clip at 0.05 acts every step. AdamW divides a uniform gradient scale
    # back out unless eps is comparable to the gradients: eps=1 (and no warm-up) makes the clip show in the losses.
    common = ["run.steps=4", "optim.warmup_steps=0", "optim.eps=1.0"]
    clip = [*common, "optim.grad_clip=0.05"]
    train(tmp_path / "single", *clip)
    train(tmp_path / "unclipped", *common)
    train(tmp_path / "ds", *clip, launcher="deepspeed", nproc=2, ds_config=_json_with(tmp_path, gradient_clipping=None))
    ref, _ = losses(tmp_path / "single")
    got, steps = losses(tmp_path / "ds")
    unclipped, _ = losses(tmp_path / "unclipped")
    assert steps == [1, 2, 3, 4]
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    assert (unclipped[1:] - ref[1:]).abs().max() > 1e-3  # without the clip the run is another one
