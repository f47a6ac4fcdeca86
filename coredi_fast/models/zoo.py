"""The model zoo: one `create_model(name, ...)` for every named SiT/DiT (`sit.py`) and JiT (`jit.py`) model.

It sits above both model files (they never import each other or this module), so each import arrow runs one way:
zoo -> sit, zoo -> jit, and both -> common.
"""
import inspect

from .jit import JIT_MODEL_CONFIGS, JiT, create_jit_model
from .sit import MODEL_CONFIGS, SiT

_OVERRIDABLE = tuple(a for a in inspect.signature(SiT).parameters if a != "name")


def list_models(include_jit: bool = False) -> list[str]:
    """Names accepted by `create_model`: SiT-/DiT-{S,B,L,XL}/{2,4,8}, SiT-Tiny/{1,2,4}, SiT-Micro/{1,2}; with
    include_jit also the pixel-space JiT-{B,L,H}/{16,32}, JiT-Tiny/{2,4}, JiT-Micro/2 (`jit.py`)."""
    if not include_jit:
        return list(MODEL_CONFIGS)
    return list(MODEL_CONFIGS) + list(JIT_MODEL_CONFIGS)


def model_family(name: str) -> str:
    """"jit" for the pixel-space JiT models (names starting with "JiT-"), else "sit" (SiT/DiT)."""
    return "jit" if isinstance(name, str) and name.startswith("JiT-") else "sit"


def create_model(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = False,
    class_dropout_prob: float = 0.1,
    **overrides,
) -> SiT | JiT:
    """Builds a zoo model, e.g. `create_model("SiT-XL/2", in_channels=4 + 8)` for ReDi on 32x32 SD-VAE latents.

    overrides: any other `SiT` argument (depth=, hidden_size=, num_heads=, mlp_ratio=, qk_norm=,
    grad_checkpointing=, projector_dims=, ...), replacing the zoo value. Unknown names raise ValueError (model)
    or TypeError (override); inconsistent sizes raise ValueError naming the argument.

    Names starting with "JiT-" build the pixel-space `JiT` (`jit.create_jit_model`): there input_size is the image
    side in pixels and in_channels the image channels (the defaults above are SiT's: pass both), the feature
    channels go in `feature_channels=`, and learn_sigma must be False (JiT predicts x).
    """
    if model_family(name) == "jit":
        if learn_sigma:
            raise ValueError(f"learn_sigma=True: {name} predicts clean data (x-prediction), it has no sigma output")
        return create_jit_model(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                class_dropout_prob=class_dropout_prob, **overrides)
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_CONFIGS)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(f"create_model() got unknown argument(s) {unknown}; valid ones: {', '.join(_OVERRIDABLE)}")
    kwargs = {**MODEL_CONFIGS[name], **overrides}
    return SiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma,
               class_dropout_prob=class_dropout_prob, name=name, **kwargs)
