"""Replay the frozen encoder's forward as a CUDA graph.

The semantic encoder runs every training step on a batch of fixed shape (per-rank batch, 3 x H x W uint8), under
no_grad, in eval mode, with no random ops: the textbook case for a CUDA graph. DINOv2-B at batch 128 launches a few
hundred kernels per forward (12 blocks of LayerNorm, qkv, attention, proj, MLP, layer scale, residual); replaying
them as one graph removes the CPU launch cost and the gaps between kernels, which matter most for the smaller
encoders and per-rank batches.

    encoder = GraphedEncoder(DINOv2Encoder(...).cuda())
    features = encoder(images_uint8)     # first call per input shape: warm up + capture; then copy-in + replay

A graph is captured per distinct (shape, dtype, device) of the input, up to `max_graphs` of them (the last, smaller
batch of an epoch is one more shape); beyond that, and on the CPU, the encoder runs eagerly. If capture fails
(an op that synchronizes with the host, for example), it warns once and runs eagerly from then on, so a graph can
only make a step faster, never stop training. The output is cloned out of the graph's static buffer: the projector
saves the features for W's gradient, and the next replay would overwrite them.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

_Key = Tuple[Tuple[int, ...], torch.dtype, torch.device]


class _Graph:
    """One captured forward: its static input buffer, the graph, and the static output it writes."""

    def __init__(self, encoder: nn.Module, example: torch.Tensor, warmup: int, pool):
        self.input = example.clone()
        # Warm-up on a side stream (as PyTorch's CUDA-graph recipe asks): lazy initialization, cuDNN/cuBLAS
        # workspace and autotuning happen here, not inside the capture.
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                encoder(self.input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            self.output = encoder(self.input)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.input.copy_(images)
        self.graph.replay()
        return self.output.clone()


class GraphedEncoder(nn.Module):
    """A frozen encoder whose CUDA forward replays captured CUDA graphs; attributes (embed_dim, num_tokens, ...)
    are the wrapped encoder's.

    encoder: a frozen module mapping images -> features with no host synchronization and no randomness.
    max_graphs: how many input shapes get a graph (further shapes run eagerly).
    warmup: eager forwards on a side stream before each capture.
    """

    def __init__(self, encoder: nn.Module, max_graphs: int = 2, warmup: int = 2):
        super().__init__()
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.encoder = encoder
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: Dict[_Key, _Graph] = {}
        self._pool = None          # one memory pool shared by this encoder's graphs
        self._disabled: Optional[str] = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            encoder = self.__dict__.get("_modules", {}).get("encoder")
            if encoder is None:
                raise
            return getattr(encoder, name)

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    @property
    def disabled_reason(self) -> Optional[str]:
        """Why graphs were switched off (a capture failed), or None."""
        return self._disabled

    def train(self, mode: bool = True) -> "GraphedEncoder":
        """Always eval, as the frozen encoder it wraps: a graph captured in eval mode must stay valid."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: what the wrapped encoder takes (e.g. uint8 (B, 3, H, W)) -> its features (B, L, D)."""
        if not images.is_cuda or self._disabled is not None or torch.cuda.is_current_stream_capturing():
            return self.encoder(images)
        key = (tuple(images.shape), images.dtype, images.device)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                return self.encoder(images)
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = _Graph(self.encoder, images, self.warmup, self._pool)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
                self._disabled = f"{type(error).__name__}: {error}"
                logger.warning("encoder CUDA graph capture failed (%s); the encoder runs eagerly from now on",
                               self._disabled)
                torch.cuda.synchronize(images.device)
                return self.encoder(images)
            self._graphs[key] = graph
        return graph(images)
