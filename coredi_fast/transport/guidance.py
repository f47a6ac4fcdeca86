"""Guidance: turn a conditional network `model(x, t, y)` into the `model_fn(x, t)` the samplers integrate.

x is (B, C, ...) with the image channels first and the feature channels after them; t is (B,); y is (B,) class
labels. Every guided wrapper runs its two branches as ONE forward pass of batch 2B (concatenated along the batch),
like ReDi's `forward_with_cfg*`, and only one pass of batch B when the guidance scale is 1.

* Classifier-free guidance (CFG): v = v_u + w (v_c - v_u) with v_u the prediction for y = null_class. ReDi
  recommends guiding the image channels only (`forward_with_cfg_vae`, FID 2.39 vs 2.86 when both modalities are
  guided); the feature channels then keep the conditional prediction.
* Representation Guidance (RG, ReDi): v = v(x_t) + w (v(x_t, z_t) - v(x_t)), where v(x_t) is the prediction with the
  feature INPUT channels zeroed, same class label, applied to all output channels. Meant for models trained with
  feature dropout.

x-prediction networks (JiT) are converted to velocity per branch, each with its own input, and the velocities are
blended: v = v_u + w (v_c - v_u) with v_b = (x_hat_b - x_b) / max(1 - t, clamp), as JiT's `_forward_sample` does
for CFG. For CFG both branches see the same x, so this equals guiding x_hat and converting once; for RG it does not:
the image-only branch sees zeroed feature channels, so its feature velocity is (x_hat_u - 0) / (1 - t) rather than
(x_hat_u - z_t) / (1 - t), and guiding x_hat first would give the wrong feature velocities.
"""
from typing import Callable, Optional, Tuple

import torch

from .path import velocity_from_x_prediction

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GUIDANCE_TARGETS = ("image", "all")
PREDICTIONS = ("velocity", "x")
INTERVAL_RULES = ("closed", "jit")


def _check_channels(image_channels: int) -> None:
    if not isinstance(image_channels, int) or isinstance(image_channels, bool) or image_channels < 1:
        raise ValueError(f"image_channels must be a positive int, got {image_channels!r}")


def _check_labels(y: torch.Tensor, x: torch.Tensor) -> None:
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels but x has batch size {x.shape[0]}")


def _check_interval(interval: Optional[Tuple[float, float]], rule: str = "closed") -> None:
    if rule not in INTERVAL_RULES:
        raise ValueError(f"interval_rule must be one of {INTERVAL_RULES}, got {rule!r}")
    if interval is None:
        return
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"interval must be (low, high) with 0 <= low <= high <= 1, got {interval!r}")


def _inside(t: torch.Tensor, interval: Tuple[float, float], rule: str) -> torch.Tensor:
    """(B,) bool: which times get guidance. "closed": low <= t <= high (REPA's rule, in SiT's time). "jit": JiT's
    `_forward_sample`, t < high and t > low, where low = 0 means no lower bound."""
    low, high = interval
    if rule == "jit":
        return (t < high) & ((t > low) if low > 0 else torch.ones_like(t, dtype=torch.bool))
    return (t >= low) & (t <= high)


def _blend(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, image_channels: Optional[int]) -> torch.Tensor:
    """v_u + w (v_c - v_u) on the first image_channels channels (all when None); the rest stay v_c."""
    if image_channels is None:
        return v_uncond + scale * (v_cond - v_uncond)
    guided = v_uncond[:, :image_channels] + scale * (v_cond[:, :image_channels] - v_uncond[:, :image_channels])
    return torch.cat([guided, v_cond[:, image_channels:]], dim=1)


def cfg_model_fn(model: Callable, y: torch.Tensor, scale: float, null_class: int, image_channels: int,
                 apply_to: str = "image", interval: Optional[Tuple[float, float]] = None,
                 interval_rule: str = "closed") -> ModelFn:
    """Classifier-free guidance as a model_fn(x (B, C, ...), t (B,)) -> (B, C, ...).

    Args:
        model: network called as model(x, t, y) -> (B, C, ...).
        y: (B,) class labels.
        scale: guidance scale w; 1 means the plain conditional prediction (one pass of batch B).
        null_class: label of the unconditional ("dropped") class, usually num_classes.
        image_channels: number of leading image channels.
        apply_to: "image" guides only the image channels (the features keep the conditional prediction, as ReDi's
            `forward_with_cfg_vae`); "all" guides every channel (ReDi's `forward_with_cfg`).
        interval: optional (low, high); guidance applies to the samples whose t is inside and the others get the
            conditional prediction. When no sample of the batch is inside, the unconditional pass is skipped (that
            test costs one host sync per step on a GPU).
        interval_rule: "closed" (low <= t <= high, as REPA) or "jit" (JiT: low < t < high, no lower bound when
            low = 0). They differ at grid times that fall on a bound: JiT's 50-step Heun grid has t = 0.1, which
            JiT's recipe interval (0.1, 1) leaves unguided.
    """
    _check_channels(image_channels)
    if apply_to not in GUIDANCE_TARGETS:
        raise ValueError(f"apply_to must be one of {GUIDANCE_TARGETS}, got {apply_to!r}")
    _check_interval(interval, interval_rule)
    guided_channels = image_channels if apply_to == "image" else None

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_labels(y, x)
        if scale == 1.0:
            return model(x, t, y)
        if interval is not None:
            inside = _inside(t, interval, interval_rule)
            if not bool(inside.any()):
                return model(x, t, y)
        y_null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        v_cond, v_uncond = out.chunk(2)
        v = _blend(v_cond, v_uncond, scale, guided_channels)
        if interval is not None:
            v = torch.where(inside.view(-1, *([1] * (v.ndim - 1))), v, v_cond)
        return v

    return model_fn


def representation_guidance_model_fn(model: Callable, y: torch.Tensor, scale: float,
                                     image_channels: int) -> ModelFn:
    """ReDi's Representation Guidance as a model_fn(x (B, C, ...), t (B,)) -> (B, C, ...).

    v = v(x with channels [image_channels:] zeroed) + scale * (v(x) - v(x with features zeroed)), on all output
    channels, both passes with label y. scale = 1 is the plain prediction (one pass).
    """
    _check_channels(image_channels)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_labels(y, x)
        if x.shape[1] <= image_channels:
            raise ValueError(f"representation guidance needs feature channels: x has {x.shape[1]} channels and "
                             f"image_channels={image_channels}")
        if scale == 1.0:
            return model(x, t, y)
        x_no_features = torch.cat([x[:, :image_channels], torch.zeros_like(x[:, image_channels:])], dim=1)
        out = model(torch.cat([x, x_no_features]), torch.cat([t, t]), torch.cat([y, y]))
        v_joint, v_image_only = out.chunk(2)
        return _blend(v_joint, v_image_only, scale, None)

    return model_fn


def make_model_fn(model: Callable, y: torch.Tensor, cfg_scale: float = 1.0, guidance_on: str = "image",
                  guidance_interval: Optional[Tuple[float, float]] = None, rg_scale: Optional[float] = None,
                  image_channels: int = 4, null_class: Optional[int] = None, prediction: str = "velocity",
                  x_pred_clamp: float = 0.05, guidance_interval_rule: str = "closed") -> ModelFn:
    """The model_fn used by the sampling CLI: plain conditional, CFG, or RG; velocity or x-prediction networks.

    Args:
        model, y: the network model(x, t, y) and the (B,) labels.
        cfg_scale, guidance_on, guidance_interval, guidance_interval_rule, null_class: classifier-free guidance
            (see `cfg_model_fn`); null_class is required when cfg_scale != 1.
        rg_scale: Representation Guidance scale (None or 1: off).
        image_channels: number of leading image channels (4 for SD-VAE latents, 3 for pixels).
        prediction: "velocity" (SiT) or "x" (JiT: each branch's output is converted with
            `velocity_from_x_prediction(out, its input, t, clamp=x_pred_clamp)` before the guidance blend).

    CFG and RG together raise ValueError: ReDi treats them as alternatives (`sample_ddp.py` uses one or the other)
    and no composition of the two has been published.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if guidance_on not in GUIDANCE_TARGETS:
        raise ValueError(f"guidance_on must be one of {GUIDANCE_TARGETS}, got {guidance_on!r}")
    _check_interval(guidance_interval, guidance_interval_rule)
    _check_channels(image_channels)
    if prediction == "x":
        if not x_pred_clamp > 0:
            raise ValueError(f"x_pred_clamp must be > 0, got {x_pred_clamp}")
        model = _velocity_network(model, x_pred_clamp)
    use_cfg = cfg_scale != 1.0
    use_rg = rg_scale is not None and rg_scale != 1.0
    if use_cfg and use_rg:
        raise ValueError(f"cfg_scale={cfg_scale} and rg_scale={rg_scale} cannot be combined: classifier-free "
                         f"guidance and representation guidance are alternatives (as in ReDi); set one to 1")
    if use_cfg:
        if null_class is None:
            raise ValueError(f"null_class is required for classifier-free guidance (cfg_scale={cfg_scale})")
        fn = cfg_model_fn(model, y, cfg_scale, null_class, image_channels, apply_to=guidance_on,
                          interval=guidance_interval, interval_rule=guidance_interval_rule)
    elif use_rg:
        fn = representation_guidance_model_fn(model, y, rg_scale, image_channels)
    else:
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _check_labels(y, x)
            return model(x, t, y)
    return fn


def _velocity_network(model: Callable, clamp: float) -> Callable:
    """An x-prediction network seen as a velocity network: (x, t, y) -> (model(x, t, y) - x) / max(1 - t, clamp),
    row by row with each row's own input (the guidance wrappers batch their branches along the rows)."""
    def network(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return velocity_from_x_prediction(model(x, t, y), x, t, clamp=clamp)

    return network
