"""Training-time distributions of t (SiT convention: t = 1 is data, t = 0 is noise).

* "uniform": t ~ U[0, 1] (SiT / ReDi default).
* "logit_normal": t = sigmoid(mean + std * n), n ~ N(0, 1), i.e. logit(t) ~ N(mean, std^2).

Sign convention. JiT's code uses the same convention as SiT: its denoiser builds z = t * x + (1 - t) * e with x
the clean image, draws t = sigmoid(P_std * randn + P_mean) and samples from t = 0 (noise) to t = 1 (LTH14/JiT's
`denoiser.py`, read in the first commits of the radiradev/JiT fork, which are LTH14's). So JiT's recipe P_mean = -0.8, P_std = 0.8 is passed
here unchanged as mean=-0.8, std=0.8; it puts more mass near the noise end (median t = sigmoid(-0.8) = 0.31).
Codebases where t = 1 is noise (SD3 / rectified-flow style) would write the same distribution as mean=+0.8.
"""
from typing import Optional

import torch

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def sample_time(batch_size: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0, eps: float = 0.0,
                device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw training times.  Returns t: (batch_size,) in [eps, 1 - eps].

    Args:
        batch_size: number of times to draw.
        kind: "uniform" or "logit_normal".
        mean, std: location and scale of logit(t) for "logit_normal" (ignored for "uniform").
        eps: keeps t away from both ends by the affine map t <- eps + (1 - 2 eps) t (applied to either kind).
            SiT trains velocity models with eps = 0.
        device, generator, dtype: where and how to draw (the generator must live on `device`).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if kind not in TIME_DISTRIBUTIONS:
        raise ValueError(f"kind must be one of {TIME_DISTRIBUTIONS}, got {kind!r}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    if kind == "logit_normal" and not std > 0:
        raise ValueError(f"std must be > 0 for kind='logit_normal', got {std}")

    if kind == "uniform":
        t = torch.rand(batch_size, device=device, generator=generator, dtype=dtype)
    else:
        n = torch.randn(batch_size, device=device, generator=generator, dtype=dtype)
        t = torch.sigmoid(mean + std * n)
    if eps > 0:
        t = eps + (1 - 2 * eps) * t
    return t
