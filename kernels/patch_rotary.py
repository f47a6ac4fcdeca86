"""A model's RoPE as the fused qk-norm + RoPE op takes it: (T, Dh/2) cos/sin tables.

Two forms of rope reach an attention's forward:

* a `(cos, sin)` pair of (T, Dh/2) tables (coredi_fast's JiT): taken as they are;
* a rotary module holding `freqs_cos`, `freqs_sin` (T, Dh) and applied as `rope(q)` on q (B, H, T, Dh) — JiT's and
  LightningDiT's `VisionRotaryEmbeddingFast` (EVA-02's layout). Per token t and channel i it holds the cos/sin of
  channel i's angle, the same angle for both channels of a pair (2j, 2j + 1), and rotates
      q·freqs_cos + rotate_pairs(q)·freqs_sin,   rotate_pairs: (a, b) -> (−b, a) on each pair (2j, 2j + 1),
  i.e. (a, b) -> (a·cos − b·sin, b·cos + a·sin): the op's rotation, with cos[t, j] = freqs_cos[t, 2j]. JiT's
  in-context class tokens have rows cos = 1, sin = 0 (not rotated): the tables carry them as they are.

The correspondence is checked when the model is patched, not assumed (`rotary_mismatch`): both channels of each pair
must hold the same angle and the module's own output on a random q must equal the op's rotation with the tables
read from it. A module with another layout — rotate-half over the two halves of Dh, angles that differ within a
pair, fewer rotated channels than Dh — is refused then, naming what did not fit. At call time the tables are views
of the module's tensors (`freqs_cos[:, 0::2]`): no copy is kept, nothing waits on the GPU, and they follow the module
across devices and in-place edits.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .qk_norm_rope.reference import _rotate


def is_rotary_module(obj) -> bool:
    """An nn.Module holding `freqs_cos` and `freqs_sin` tensors (buffers or plain attributes, as in JiT)."""
    return isinstance(obj, nn.Module) and all(
        isinstance(getattr(obj, name, None), Tensor) for name in ("freqs_cos", "freqs_sin"))


def rotary_tables(rope: nn.Module) -> tuple[Tensor, Tensor]:
    """(cos, sin), each a (T, Dh/2) view of the module's (T, Dh) `freqs_cos` / `freqs_sin`: one angle per pair."""
    return rope.freqs_cos[:, 0::2], rope.freqs_sin[:, 0::2]


def rotary_mismatch(rope: nn.Module, head_dim: int) -> Optional[str]:
    """Why the op cannot stand in for `rope` on heads of `head_dim` channels (None: it can).

    Reads the tables (a host sync: run once, when the model is patched) and calls the module once on a random
    float64 q (2, 1, T, Dh) on the tables' device.
    """
    cos_full, sin_full = rope.freqs_cos, rope.freqs_sin
    if cos_full.dim() != 2 or cos_full.shape != sin_full.shape:
        return (f"its freqs_cos / freqs_sin are {tuple(cos_full.shape)} / {tuple(sin_full.shape)}, not two (T, Dh) "
                f"tables of one row per token")
    T, width = cos_full.shape
    if width != head_dim:
        return (f"it rotates {width} channels but the attention heads have Dh = {head_dim}: the op rotates every "
                f"channel of a head")
    if head_dim % 4:
        return f"Dh = {head_dim} is not divisible by 4, as the op's 2D RoPE needs"
    if not (torch.equal(cos_full[:, 0::2], cos_full[:, 1::2]) and torch.equal(sin_full[:, 0::2], sin_full[:, 1::2])):
        return ("the two channels of a pair (2j, 2j + 1) hold different angles: not the interleaved-pair layout "
                "the op rotates")
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, T, head_dim, generator=generator, dtype=torch.float64).to(cos_full.device)
    try:
        with torch.no_grad():
            want = rope(q)
    except Exception as error:  # any failure of the probe means: not a module the op can stand in for
        return f"calling it on q of shape {tuple(q.shape)} raised {type(error).__name__}: {error}"
    if not isinstance(want, Tensor) or want.shape != q.shape:
        return f"calling it on q of shape {tuple(q.shape)} did not return a tensor of that shape"
    cos, sin = rotary_tables(rope)
    got = _rotate(q.transpose(1, 2), cos, sin).transpose(1, 2)  # the op's rotation, float64
    error = (want.double() - got).abs().max().item()
    if not error <= 1e-5:
        return (f"its output on a random q differs from the interleaved-pair rotation by up to {error:.3g} (the op "
                f"rotates pairs (2j, 2j + 1); rotate-half over the two halves of Dh is another layout)")
    return None


class RopeReader:
    """The rotary modules of one model checked at patch time, and the tables of whatever rope an attention gets."""

    def __init__(self, named_modules: list):
        self.names = tuple(name for name, _ in named_modules)  # for reports
        self.modules = [module for _, module in named_modules]

    def tables(self, rope):
        """(cos, sin) for the op; (None, None) for no rope; None for a rope it does not know (the model's own
        attention must apply it). Identity comparisons only: no host sync, same guards under torch.compile."""
        if rope is None:
            return None, None
        if isinstance(rope, (tuple, list)) and len(rope) == 2 and all(isinstance(t, Tensor) for t in rope):
            return tuple(rope)
        for module in self.modules:
            if rope is module:
                return rotary_tables(module)
        return None

    def is_checked_module(self, rope) -> bool:
        return any(rope is module for module in self.modules)
