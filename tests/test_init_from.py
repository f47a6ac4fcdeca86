"""model.init_from: a fresh run starts from a checkpoint's weights (ReDi's, SiT's / REPA's, a state dict, ours).

The public files are written the way ReDi's train_redi.py writes them, `torch.save({"model", "ema", "opt", "args"})`
with `args` an argparse.Namespace, from `RefReDiSiT` (tests/test_sit_compat.py: a model in ReDi's attribute layout,
REPA head `projector.*` included) at the size of the tiny digits run (SiT-Micro/2 on 16x16 digits, 1 image + 4
feature channels, 10 classes + the null class). The trainer is built in-process, as tests/test_hflip.py does; after
set-up and before any step its model and its EMA must equal the file's tensors exactly, and compute what the
reference module computes. Refusals go through preflight (one subprocess checks the CLI: exit 2, one line, no run
folder). Malicious pickles must be refused without running.
"""
import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

from coredi_fast.training.config import load_config
from coredi_fast.training.distributed import DistInfo
from coredi_fast.training.init_from import read_init_weights
from coredi_fast.training.loop import Trainer
from coredi_fast.training.preflight import preflight
from coredi_fast.training.run_folder import RunSetupError
from test_sit_compat import RefReDiSiT
from test_training import ROOT, TINY, _env

CPU = torch.device("cpu")
FEATURES = 4          # the demo's method.projector.dim: the denoiser sees 1 + 4 channels
HEAD = 6              # tensors of ReDi's REPA head, projector.{0,2,4}.{weight,bias}


def redi_model(seed: int, in_channels: int = 1 + FEATURES, depth: int = 2) -> RefReDiSiT:
    """A ReDi-layout SiT-Micro/2 on 16x16 inputs, every weight but the sin-cos table random (seeded)."""
    model = RefReDiSiT(16, 2, in_channels, 64, depth, 2, 10, learn_sigma=False, z_dim=24, projector_dim=32,
                       repa_layer=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model.eval()


def save_like_train_redi(path, model: RefReDiSiT, ema: RefReDiSiT) -> None:
    """train_redi.py's checkpoint: model.module.state_dict(), ema.state_dict(), opt.state_dict(), args."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(2, 1 + FEATURES, 16, 16), torch.rand(2), torch.tensor([1, 2]))[0].square().mean().backward()
    opt.step()  # a real optimizer state (moments, step), which init_from must leave behind
    args = argparse.Namespace(model="SiT-Micro/2", pca_rank=FEATURES, repa_loss=True, repa_layer=1, ckpt=None,
                              global_batch_size=256, results_dir="results", dino_drop_prob=None)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)


@pytest.fixture(scope="module")
def redi_file(tmp_path_factory):
    """(path, model weights, ema weights) of a ReDi-style checkpoint; the two entries differ everywhere."""
    path = tmp_path_factory.mktemp("redi") / "0400000.pt"
    model, ema = redi_model(seed=1), redi_model(seed=2)
    save_like_train_redi(path, model, ema)
    return path, model, ema


def config(out, *overrides):
    return load_config(None, [*TINY, "encoder.statistics_batches=2", "run.steps=1", f"run.out_dir={out}",
                              *overrides])


def trainer(out, *overrides) -> Trainer:
    return Trainer(config(out, *overrides), DistInfo(rank=0, local_rank=0, world_size=1, device=CPU,
                                                     launcher="single"))


def assert_weights(got: dict, want: dict) -> None:
    """Same keys and bit-identical values (REPA head keys excepted: they are dropped)."""
    want = {k: v for k, v in want.items() if not k.startswith("projector.")}
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name].float(), value.float()), name


# --------------------------------------------------------------------------------------- (1) it initializes

@pytest.mark.parametrize("fused_ema", ["auto", "off"])  # the EMA inside AdamWEMA, or the separate fp32 copy
@pytest.mark.parametrize("which", ["ema", "model"])
def test_a_redi_checkpoint_initializes_model_and_ema(redi_file, tmp_path, capsys, which, fused_ema):
    path, model, ema = redi_file
    source = {"ema": ema, "model": model}[which]
    t = trainer(tmp_path / "run", f"model.init_from={path}", f"model.init_weights={which}",
                f"optim.fused_ema={fused_ema}")
    t.resume()  # a fresh folder: nothing to resume, the loaded weights stay
    assert t.step == 0 and t.initialized_from
    # A fresh optimizer: nothing of the file's "opt" (a stepped AdamW). Checked first: reading AdamWEMA's EMA fills in
    # its state.
    assert len(t.engine.optimizer.state) == 0
    assert_weights(t.denoiser.state_dict(), source.state_dict())
    assert_weights(t.ema.state_dict(), source.state_dict())  # the EMA starts equal to the loaded weights
    other = {"ema": model, "model": ema}[which]
    assert not torch.equal(t.denoiser.state_dict()["blocks.0.attn.qkv.weight"],
                           other.state_dict()["blocks.0.attn.qkv.weight"])
    # The weights sit where ReDi's module uses them: the same prediction for the same inputs.
    g = torch.Generator().manual_seed(3)
    x, tt, y = torch.randn(3, 1 + FEATURES, 16, 16, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 9])
    t.denoiser.eval()
    with torch.no_grad():
        torch.testing.assert_close(t.denoiser(x, tt, y), source(x, tt, y)[0], atol=1e-5, rtol=0)
    out = capsys.readouterr().out
    n = len(source.state_dict()) - HEAD
    assert (f"model.init_from: the '{which}' weights of {path}" in out and f"{n} tensors into SiT-Micro/2" in out
            and f"{HEAD} REPA head tensors (projector.*) dropped" in out and "trained as SiT-Micro/2" in out
            and "the optimizer starts fresh" in out and "encoder.pca_file" in out), out


def test_a_bare_state_dict_initializes(redi_file, tmp_path):
    _, _, ema = redi_file
    path = tmp_path / "SiT-Micro-2.pt"
    torch.save({f"module.{k}": v for k, v in ema.state_dict().items()}, path)  # as a DDP module would name them
    assert read_init_weights(path).key == "state dict"
    t = trainer(tmp_path / "run", f"model.init_from={path}", "model.init_weights=model")  # nothing to choose
    assert_weights(t.denoiser.state_dict(), ema.state_dict())
    assert_weights(t.ema.state_dict(), ema.state_dict())


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory):
    """A run folder holding one of our checkpoints whose model, EMA and W all differ from a fresh trainer's."""
    out = tmp_path_factory.mktemp("ours")
    t = trainer(out, "run.seed=5", "optim.fused_ema=off")  # an EMA of its own, which the changes below skip
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in t.denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        t.objective.projector.weight.add_(torch.randn(t.objective.projector.weight.shape, generator=g))
    t.step = 3
    path = t.save()
    blob = torch.load(path, weights_only=True)
    assert not torch.equal(blob["model"]["blocks.0.mlp.fc1.weight"], blob["ema"]["blocks.0.mlp.fc1.weight"])
    return out, path, blob


@pytest.mark.parametrize("which", ["ema", "model"])
def test_our_checkpoint_brings_its_projector(our_checkpoint, tmp_path, which):
    _, path, blob = our_checkpoint
    t = trainer(tmp_path / "run", f"model.init_from={path}", f"model.init_weights={which}")
    assert_weights(t.denoiser.state_dict(), blob[which])
    assert_weights(t.ema.state_dict(), blob[which])
    assert_weights(t.objective.projector.state_dict(), blob["projector"])  # W, BatchNorm, statistics
    with pytest.raises(ValueError, match="model.init_from: .* encoder.statistics would be replaced"):
        preflight(config(tmp_path / "other", f"model.init_from={path}", f"encoder.statistics={path}"))
    with pytest.raises(ValueError, match=r"model.init_from: .*method.projector.norm='batchnorm' there, 'none' here"):
        preflight(config(tmp_path / "other", f"model.init_from={path}", "method.projector.norm=none"))


# ------------------------------------------------------------------------------------- (3) resume wins

def test_a_run_with_its_own_checkpoint_resumes_and_ignores_init_from(our_checkpoint, redi_file, tmp_path, capsys):
    folder, path, blob = our_checkpoint
    out = tmp_path / "run"
    shutil.copytree(folder, out)
    missing = tmp_path / "gone.pt"
    preflight(config(out, "run.seed=5", f"model.init_from={missing}"))  # not even read: the run resumes
    t = trainer(out, "run.seed=5", f"model.init_from={redi_file[0]}")
    assert not t.initialized_from
    t.resume()
    assert t.step == 3
    assert_weights(t.denoiser.state_dict(), blob["model"])
    assert_weights(t.ema.state_dict(), blob["ema"])
    out_text = capsys.readouterr().out
    assert "model.init_from ignored: the run continues from its own checkpoint (step-0000003.pt)" in out_text
    assert "model.init_from: the" not in out_text


def test_a_folder_whose_checkpoints_are_all_damaged_asks_for_a_restart_then_initializes(redi_file, tmp_path):
    path, _, ema = redi_file
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-0000004.pt").write_bytes(b"half a checkpoint")
    t = trainer(out, f"model.init_from={path}")
    with pytest.raises(RunSetupError, match="model.init_from was not applied .* start again"):
        t.resume()
    assert (out / "checkpoints" / "step-0000004.pt.damaged").is_file()
    t = trainer(out, f"model.init_from={path}")  # the second start is a fresh one
    t.resume()
    assert t.initialized_from and t.step == 0
    assert_weights(t.denoiser.state_dict(), ema.state_dict())


def test_train_py_starts_from_the_file_then_resumes_its_own_checkpoint(redi_file, tmp_path):
    """The CLI end to end, one step each: a fresh run says what it loaded; its restart resumes and says init_from is
    ignored."""
    path = redi_file[0]
    out = tmp_path / "run"
    args = [sys.executable, "train.py", f"run.out_dir={out}", *TINY, f"model.init_from={path}"]
    first = subprocess.run(args + ["run.steps=1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"model.init_from: the 'ema' weights of {path}" in first.stdout
    second = subprocess.run(args + ["run.steps=2"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "model.init_from ignored" in second.stdout
    assert "model.init_from: the" not in second.stdout


# ------------------------------------------------------------------------- (2) refused at start-up

def _mismatching_files(tmp_path, ema):
    """{case: (file, words the error must hold)} for files that are not this model's weights."""
    files = {}
    wide = tmp_path / "redi_in256.pt"  # ReDi on ImageNet latents: 4 latent + 8 PCA channels
    torch.save({"model": redi_model(1, in_channels=12).state_dict(), "ema": redi_model(2, in_channels=12).state_dict(),
                "args": argparse.Namespace(model="SiT-Micro/2")}, wide)
    files["shape"] = (wide, "x_embedder.proj.weight is [64, 12, 2, 2] in the file, [64, 5, 2, 2] here")
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in ema.state_dict().items() if not k.startswith("final_layer.")}, partial)
    files["missing"] = (partial, "missing final_layer.")
    deeper = tmp_path / "deeper.pt"
    torch.save({"ema": redi_model(2, depth=3).state_dict()}, deeper)
    files["unexpected"] = (deeper, "unexpected blocks.2.")
    files["absent"] = (tmp_path / "nowhere.pt", "checkpoint not found")
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    files["text"] = (text, "not a whole file written by torch.save")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    files["list"] = (listed, "holds a list, not model weights")
    log = tmp_path / "log.pt"
    torch.save({"epoch": 3, "loss": torch.tensor(0.5)}, log)
    files["no weights"] = (log, "holds no model weights")
    return files


@pytest.mark.parametrize("case", ["shape", "missing", "unexpected", "absent", "text", "list", "no weights"])
def test_files_that_do_not_fit_are_refused_by_preflight(redi_file, tmp_path, case):
    path, words = _mismatching_files(tmp_path, redi_file[2])[case]
    with pytest.raises(ValueError) as info:
        preflight(config(tmp_path / "out", f"model.init_from={path}"))
    message = str(info.value)
    assert message.startswith("model.init_from:") and words in message and "\n" not in message, message


def test_train_py_refuses_a_mismatch_in_one_line_with_status_2_and_writes_nothing(redi_file, tmp_path):
    path, words = _mismatching_files(tmp_path, redi_file[2])["shape"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train.py", f"run.out_dir={out}", *TINY, f"model.init_from={path}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "model.init_from:" in proc.stderr and words in proc.stderr
    assert not out.exists()


def test_init_weights_is_checked():
    with pytest.raises(ValueError, match="model.init_weights must be one of"):
        load_config(None, ["model.init_weights=last"])


# ----------------------------------------------------------------------------- (4) malicious pickles

class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("where", ["model", "args"])
def test_a_pickle_that_runs_code_is_refused_unexecuted(redi_file, tmp_path, where):
    """Anywhere in the file: in the weights, or inside the argparse.Namespace that is allowed for "args"."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    weights = redi_file[2].state_dict()
    evil = RunsCode(f"touch {marker}")
    blob = {"model": evil, "ema": weights} if where == "model" else {
        "model": weights, "ema": weights, "args": argparse.Namespace(model="SiT-Micro/2", hook=evil)}
    torch.save(blob, path)
    with pytest.raises(ValueError, match=r"model.init_from: cannot read checkpoint .*evil\.pt: it holds a pickled "
                                         r"(posix|nt|os)\.system, which is not weights; refused"):
        read_init_weights(path)
    with pytest.raises(ValueError, match="model.init_from:"):
        preflight(config(tmp_path / "out", f"model.init_from={path}"))
    assert not marker.exists()
