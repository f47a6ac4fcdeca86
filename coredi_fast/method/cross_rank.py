"""Statistics over the *global* batch when training runs on several processes.

CoReDi's BatchNorm (and the covariance regularizer) take statistics over all tokens of a batch. Under DDP or
DeepSpeed each rank only holds its slice, so per-rank statistics would make an R-process run compute a different
loss than a 1-process run with the same global batch. `cross_rank_sum` sums a tensor over ranks with an
autograd-aware all-reduce, so both the statistics and their gradients are those of the global batch. Without an
initialized process group (or with one rank) it is the identity and costs nothing.

torch's own `nn.SyncBatchNorm` does this on GPUs only (it refuses CPU tensors), hence this small module, which also
works with gloo on CPU.
"""
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cross_rank_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks; differentiable (the backward all-reduces the gradient)."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    # Deprecated in recent torch in favour of functional collectives, which have no autograd for all_reduce; it is
    # still the differentiable all-reduce on torch 2.11-2.14.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) tokens whose batch statistics span every rank.

    Same parameters, buffers and state-dict keys as `nn.BatchNorm1d`, and the same numbers in one process. With
    several ranks, training-mode statistics are the mean and (biased) variance over all ranks' tokens, computed in
    two passes (sum, then sum of squared deviations) for accuracy; running statistics are updated with the
    unbiased variance, as torch does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"TokenBatchNorm expects (N, C) tokens, got shape {tuple(x.shape)}")
        count = cross_rank_sum(x.new_tensor(float(x.shape[0])))
        mean = cross_rank_sum(x.sum(dim=0)) / count
        centered = x - mean
        var = cross_rank_sum((centered * centered).sum(dim=0)) / count
        out = centered * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased, momentum)
        return out
