"""Dataset statistics of encoder features: per-channel mean and std, and the PCA of the standardized features.

ReDi (`calc_pca.py`) standardizes DINOv2 patch tokens per channel with dataset mean/std and fits a PCA on them; the
fixed-PCA projector (ReDi) uses the top-d components, the learned projector (CoReDi) can start from them, and both
standardize their input with the same mean/std.

Accumulation. The statistics stream over batches, so they scale to millions of tokens without holding them. We keep
(count, mean, M2) with M2 = sum_n (x_n - mean)(x_n - mean)^T in float64 and fold batches in with Chan et al.'s
parallel update (Chan, Golub & LeVeque 1979): a batch's own mean and centered M2 are computed exactly, then combined

    delta = mean_b - mean_a,  n = n_a + n_b
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta delta^T * n_a n_b / n

Unlike raw sums of x x^T, this never subtracts two large numbers, so features with a large offset relative to their
spread keep full precision, and `merge` (gathering statistics across ranks) is the same formula as `update`.

Conventions: std and covariance use the unbiased 1/(N-1) normalization (as `numpy.cov` and sklearn's PCA explained
variance). A channel with zero variance gets std 1 (it standardizes to 0), as in sklearn's StandardScaler.
"""
import os
from typing import NamedTuple, Optional, Union

import torch

_FORMAT = "coredi_fast.FeatureStatistics"
_VERSION = 1
_KEYS = ("format", "version", "feature_dim", "count", "mean", "m2")


class PCA(NamedTuple):
    """Principal components of the standardized features.

    eigenvalues: (D,) float64, descending: the variance of the standardized features along each component.
    components: (D, D) float64, row k is the k-th principal direction (unit norm; sign fixed so that its entry of
        largest magnitude is positive). (K, D), K <= D, with the signs as stored, for `FixedFeatureStatistics`.
    explained_variance_ratio: (D,) float64, eigenvalues / their sum.
    """
    eigenvalues: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio: torch.Tensor


class FeatureStatistics:
    """Streaming mean / std / covariance / PCA of encoder tokens.

    Args:
        feature_dim: D, the channel count of the tokens (768 for DINOv2-B).
        device: where the float64 accumulators live (default: the device of the first batch).

    Usage::

        stats = FeatureStatistics(768)
        for batch in loader:
            stats.update(encoder(batch))        # (B, L, D) or (N, D)
        stats.merge(other_rank_stats)           # optional, e.g. after gathering across ranks
        stats.save("dino_stats.pt")
        pca = stats.pca()                        # pca.components[:8] = ReDi's projection
    """

    def __init__(self, feature_dim: int, device: Optional[Union[str, torch.device]] = None):
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.feature_dim = feature_dim
        self.count = 0
        self.mean = torch.zeros(feature_dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(feature_dim, feature_dim, dtype=torch.float64, device=device)
        self._device_fixed = device is not None
        self._pca_cache: Optional[PCA] = None

    # ------------------------------------------------------------------ accumulation

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> "FeatureStatistics":
        """Fold in a batch of tokens, features: (..., D) (e.g. (B, L, D) or (N, D)); returns self."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a tensor of shape (..., {self.feature_dim}), "
                            f"got {type(features).__name__}")
        if features.ndim < 1 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"features must have shape (..., {self.feature_dim}), got {tuple(features.shape)}")
        if not self._device_fixed and self.count == 0:
            self.to(features.device)
            self._device_fixed = True
        tokens = features.reshape(-1, self.feature_dim).to(device=self.mean.device, dtype=torch.float64)
        if tokens.shape[0] == 0:
            return self
        if not torch.isfinite(tokens).all():
            raise ValueError("features contain NaN or inf; statistics would be meaningless")
        batch_mean = tokens.mean(dim=0)
        centered = tokens - batch_mean
        self._combine(tokens.shape[0], batch_mean, centered.T @ centered)
        return self

    @torch.no_grad()
    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Fold in another accumulator (e.g. another rank's); returns self."""
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"other must be a FeatureStatistics, got {type(other).__name__}")
        if other.feature_dim != self.feature_dim:
            raise ValueError(f"other has feature_dim={other.feature_dim}, this one {self.feature_dim}")
        device = self.mean.device
        self._combine(other.count, other.mean.to(device), other.m2.to(device))
        return self

    def _combine(self, count_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if count_b == 0:
            return
        count_a = self.count
        total = count_a + count_b
        delta = mean_b - self.mean
        self.mean += delta * (count_b / total)
        self.m2 += m2_b + torch.outer(delta, delta) * (count_a * count_b / total)
        self.count = total
        self._pca_cache = None

    def to(self, device: Union[str, torch.device]) -> "FeatureStatistics":
        """Move the accumulators to `device` (in place); returns self."""
        self.mean = self.mean.to(device)
        self.m2 = self.m2.to(device)
        self._pca_cache = None
        return self

    # ------------------------------------------------------------------ results (float64)

    def _require_tokens(self) -> None:
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 tokens, got count={self.count}")

    @property
    def covariance(self) -> torch.Tensor:
        """(D, D) covariance of the raw features, 1/(N-1) normalization."""
        self._require_tokens()
        return self.m2 / (self.count - 1)

    @property
    def std(self) -> torch.Tensor:
        """(D,) per-channel standard deviation (unbiased); zero-variance channels get 1."""
        var = torch.diagonal(self.covariance).clamp_min(0.0)
        std = var.sqrt()
        return torch.where(std > 0, std, torch.ones_like(std))

    @property
    def standardized_covariance(self) -> torch.Tensor:
        """(D, D) covariance of (x - mean) / std, i.e. the correlation matrix for non-constant channels."""
        std = self.std
        return self.covariance / torch.outer(std, std)

    @property
    def standardized_mean(self) -> torch.Tensor:
        """(D,) mean of the standardized features: 0, since mean/std come from the same tokens.

        Kept so the projector can use ReDi's formula ((x - mean)/std - pca_mean) P unchanged; ReDi's shipped file has a
        nonzero pca_mean because its mean/std and its PCA were fit on different data.
        """
        return torch.zeros_like(self.mean)

    def pca(self) -> PCA:
        """Eigendecomposition of the standardized covariance (cached until the next update/merge)."""
        if self._pca_cache is None:
            cov = self.standardized_covariance
            cov = 0.5 * (cov + cov.T)  # exact symmetry for eigh
            eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending, columns are eigenvectors
            eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
            components = vectors.flip(1).T.contiguous()
            # Deterministic sign: the entry of largest magnitude is positive (eigh's sign is arbitrary).
            largest = components.abs().argmax(dim=1, keepdim=True)
            signs = torch.sign(components.gather(1, largest))
            components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
            total = eigenvalues.sum()
            ratio = eigenvalues / total if total > 0 else torch.zeros_like(eigenvalues)
            self._pca_cache = PCA(eigenvalues, components, ratio)
        return self._pca_cache

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """A dict of plain values and CPU tensors (what `save` writes)."""
        return {"format": _FORMAT, "version": _VERSION, "feature_dim": self.feature_dim, "count": int(self.count),
                "mean": self.mean.detach().cpu(), "m2": self.m2.detach().cpu()}

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "state") -> "FeatureStatistics":
        """Rebuild from `state_dict()`; `source` names the origin in error messages."""
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a dict with keys {_KEYS}, got {type(state).__name__}")
        missing = [key for key in _KEYS if key not in state]
        if missing:
            raise ValueError(f"{source}: not a FeatureStatistics file, missing keys {missing}")
        if state["format"] != _FORMAT or state["version"] != _VERSION:
            raise ValueError(f"{source}: format {state['format']!r} version {state['version']!r}, "
                             f"expected {_FORMAT!r} version {_VERSION}")
        dim = state["feature_dim"]
        mean, m2 = state["mean"], state["m2"]
        if (not isinstance(mean, torch.Tensor) or not isinstance(m2, torch.Tensor)
                or tuple(mean.shape) != (dim,) or tuple(m2.shape) != (dim, dim)):
            raise ValueError(f"{source}: mean/m2 must have shapes ({dim},) and ({dim}, {dim})")
        stats = cls(int(dim), device="cpu")
        stats.count = int(state["count"])
        stats.mean = mean.to(torch.float64).clone()
        stats.m2 = m2.to(torch.float64).clone()
        return stats

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically (temporary file in the same folder, then rename): a crash never leaves a partial file."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureStatistics":
        """Read a file written by `save` (with `weights_only=True`: no code runs on load). Tensors land on CPU."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feature statistics file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / not a torch file / unsafe content
            raise ValueError(f"{path}: cannot read feature statistics ({type(exc).__name__}: {exc})") from exc
        return cls.from_state_dict(state, source=path)

    def __repr__(self) -> str:
        return f"FeatureStatistics(feature_dim={self.feature_dim}, count={self.count}, device={self.mean.device})"


class FixedFeatureStatistics(FeatureStatistics):
    """Statistics that were given rather than accumulated, used exactly as stored: ReDi's published PCA file
    (`redi_pca.load_redi_pca`). The projector standardizes with them as ReDi does,

        ((f - mean) / std - pca_mean) @ components[:d].T

    Args:
        mean, std: (D,) token mean and std (std > 0; ReDi's is numpy's population std).
        pca_mean: (D,) mean of the standardized tokens the PCA was fitted on (`standardized_mean`).
        components: (K, D) principal directions, rows by decreasing variance (K may be < D).
        eigenvalues: (K,) their variances, or None when not stored (then NaN).
        count: tokens they were computed from (for reports only); source: where they came from (for messages);
        whiten: the PCA's whiten flag, kept for reports (the projection never whitens, see `redi_pca`).

    Nothing accumulates: `update`/`merge` raise, and so do `covariance` and `state_dict` (the file they came from
    is the record; configs name it as encoder.pca_file).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, pca_mean: torch.Tensor, components: torch.Tensor,
                 eigenvalues: Optional[torch.Tensor] = None, count: int = 0, source: str = "given",
                 whiten: bool = False):
        dim = int(mean.shape[0])
        super().__init__(dim, device="cpu")
        shapes = {"std": (std, (dim,)), "pca_mean": (pca_mean, (dim,)),
                  "components": (components, (components.shape[0], dim))}
        for name, (value, shape) in shapes.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, expected {shape}")
        if eigenvalues is not None and tuple(eigenvalues.shape) != (components.shape[0],):
            raise ValueError(f"{source}: eigenvalues have shape {tuple(eigenvalues.shape)}, expected "
                             f"({components.shape[0]},)")
        self.m2 = torch.zeros(0, dtype=torch.float64)   # never used: nothing accumulates
        self.mean = mean.to(torch.float64).clone()
        self._std = std.to(torch.float64).clone()
        self._pca_mean = pca_mean.to(torch.float64).clone()
        self._components = components.to(torch.float64).clone()
        if eigenvalues is None:
            eigenvalues = torch.full((components.shape[0],), float("nan"), dtype=torch.float64)
        self._eigenvalues = eigenvalues.to(torch.float64).clone()
        self.count = int(count)
        self.source = source
        self.whiten = bool(whiten)

    def _fixed(self, what: str):
        return TypeError(f"{what}: the feature statistics from {self.source} are fixed (imported), not accumulated")

    def update(self, features: torch.Tensor) -> "FeatureStatistics":
        raise self._fixed("update")

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        raise self._fixed("merge")

    def to(self, device: Union[str, torch.device]) -> "FixedFeatureStatistics":
        for name in ("mean", "_std", "_pca_mean", "_components", "_eigenvalues"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def covariance(self) -> torch.Tensor:
        raise self._fixed("covariance")

    @property
    def std(self) -> torch.Tensor:
        """(D,) the stored std."""
        return self._std

    @property
    def standardized_mean(self) -> torch.Tensor:
        """(D,) the stored PCA mean (nonzero in ReDi's file: its mean/std and its PCA saw different batches)."""
        return self._pca_mean

    def pca(self) -> PCA:
        """The stored basis: eigenvalues (K,), components (K, D), explained_variance_ratio (K,) of the K stored."""
        total = self._eigenvalues.sum()
        return PCA(self._eigenvalues, self._components, self._eigenvalues / total)

    def state_dict(self) -> dict:
        raise self._fixed("state_dict")

    def __repr__(self) -> str:
        return (f"FixedFeatureStatistics(feature_dim={self.feature_dim}, components={self._components.shape[0]}, "
                f"source={self.source!r})")
