"""Config files and command-line overrides: typed, validated, round-trippable, errors naming the field."""
from pathlib import Path

import pytest

from coredi_fast.training.config import TrainConfig, load_config, parse_step_window

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, mode", [("imagenet256_coredi_xl", "learned"), ("imagenet256_redi_xl", "pca"),
                                        ("imagenet256_redi_bn_xl", "pca"), ("imagenet256_sit_xl", "none")])
def test_shipped_imagenet_configs_validate(name, mode):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    assert cfg.model.name == "SiT-XL/2" and cfg.data.global_batch_size == 256 and cfg.optim.lr == 1e-4
    assert cfg.method.projector.mode == mode
    if mode != "none":
        assert (cfg.method.projector.feature_dim, cfg.method.projector.dim) == (768, 8)
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg


def test_shipped_jit_config_validates_with_jits_recipe():
    cfg = load_config(str(CONFIGS / "imagenet256_jit_b16_coredi.yaml"))
    assert cfg.is_jit and cfg.model.name == "JiT-B/16" and cfg.method.prediction == "x"
    assert (cfg.method.time_sampling, cfg.method.time_mean, cfg.method.time_std) == ("logit_normal", -0.8, 0.8)
    # JiT's lr rule: base lr 5e-5 per 256 images; 5 warm-up epochs of ImageNet's 1281167 training images.
    assert cfg.optim.lr == pytest.approx(5e-5 * cfg.data.global_batch_size / 256)
    assert cfg.optim.warmup_steps == round(5 * 1281167 / cfg.data.global_batch_size)
    # JiT's main_jit.py: AdamW betas (0.9, 0.95), RandomHorizontalFlip in the training transform, no clipping.
    assert cfg.optim.betas == (0.9, 0.95) and cfg.data.hflip and cfg.optim.grad_clip == 0.0
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_round_trips(path):
    cfg = load_config(str(path))
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def test_the_redi_bn_baseline_differs_from_redi_only_in_the_projector_norm():
    # CoReDi changes two things against ReDi (a learned W, BatchNorm'd features); redi_bn takes only the second, so
    # CoReDi vs redi_bn measures the learned W alone.
    redi = _flat(load_config(str(CONFIGS / "imagenet256_redi_xl.yaml")).to_dict())
    redi_bn = _flat(load_config(str(CONFIGS / "imagenet256_redi_bn_xl.yaml")).to_dict())
    assert redi.keys() == redi_bn.keys()
    differ = {k: (redi[k], redi_bn[k]) for k in redi if redi[k] != redi_bn[k]}
    assert differ == {"method.projector.norm": ("none", "batchnorm"),
                      "run.out_dir": ("runs/redi_sit_xl2", "runs/redi_bn_sit_xl2")}
    assert redi_bn["method.projector.mode"] == "pca" and redi_bn["method.projector.norm_affine"] is False


def test_demo_config_file_equals_the_embedded_defaults():
    assert load_config(str(CONFIGS / "demo_digits.yaml")) == load_config(None)


def test_overrides_are_typed_by_their_field():
    cfg = load_config(None, ["optim.lr=3e-4", "run.profile_steps=10:20", "optim.betas=[0.9,0.95]",
                             "encoder.weights=null", "model.overrides={depth: 2}", "run.tensorboard=false"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.profile_steps == "10:20" and parse_step_window(cfg.run.profile_steps) == (10, 20)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.encoder.weights is None
    assert cfg.model.overrides == {"depth": 2} and cfg.run.tensorboard is False


def test_partial_projector_override_keeps_mode_dependent_defaults():
    cfg = load_config(None, ["method.projector.mode=pca"])
    assert cfg.method.projector.norm == "none" and cfg.method.projector.regularizer == "none"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr"), ("run.steps=abc", "run.steps"), ("data.loader=fast", "data.loader"),
    ("method.projector.dim=65", "method.projector"), ("optim.lrr=1", "optim.lrr"), ("run.profile_steps=5:2", "A < B"),
    ("model.name=SiT-Huge/2", "model.name"), ("data.source=shards", "data.path"),
    ("model.compile_mode=fastest", "model.compile_mode"), ("encoder.cuda_graph=sometimes", "encoder.cuda_graph"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
