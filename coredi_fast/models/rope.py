"""2D axial rotary position embedding (RoPE) for JiT's attention, in JiT's channel layout.

Each head's Dh channels form Dh/2 consecutive pairs (2j, 2j + 1). A token at grid position (row r, column c)
rotates pair j by the angle

    r · θ_j              for j <  Dh/4          (the first half of the channels encodes the row),
    c · θ_(j − Dh/4)     for j >= Dh/4          (the second half encodes the column),
    θ_i = theta ** (−i / (Dh/4)),  i = 0 .. Dh/4 − 1,  theta = 10000,

i.e. (x_2j, x_2j+1) -> (x_2j·cos − x_2j+1·sin, x_2j+1·cos + x_2j·sin). Tokens are numbered row-major on the
grid. Prefix tokens (JiT's in-context class tokens, placed before the grid tokens) are not rotated (angle 0).
This is what JiT's `VisionRotaryEmbeddingFast(dim=Dh/2, pt_seq_len=G, num_cls_token=L)` computes, with
`rotate_half` acting on interleaved pairs. Because the rotations compose, ⟨R_m q, R_n k⟩ depends on m − n only.
"""
import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """θ_i = theta ** (−i / (Dh/4)) for the Dh/4 pairs of one axis: (head_dim // 4,) float64."""
    if head_dim % 4:
        raise ValueError(f"head_dim ({head_dim}) must be divisible by 4 for 2D RoPE (two axes of channel pairs)")
    quarter = head_dim // 4
    return theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)


def rope_2d_tables(head_dim: int, grid_size: int, num_prefix_tokens: int = 0, theta: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every pair's angle: two (num_prefix_tokens + grid_size², head_dim // 2) tables of `dtype`
    (computed in float64).

    Row t (after the prefix) is grid token t = r · grid_size + c; prefix rows are cos = 1, sin = 0.
    """
    freqs = rope_frequencies(head_dim, theta)                                    # (Dh/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (G², Dh/2) float64
    angles = torch.cat([angles.new_zeros(num_prefix_tokens, head_dim // 2), angles], dim=0)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of x (B, T, H, Dh) by the angles of `rope_2d_tables` ((T, Dh/2) each).

    Computed in at least float32 (the angles reach grid_size radians; bf16 would lose them), returned in x's
    dtype.
    """
    if cos.shape != (x.shape[1], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: cos/sin must be (T, Dh/2) = {(x.shape[1], x.shape[-1] // 2)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(dtype).unflatten(-1, (-1, 2))                                    # (B, T, H, Dh/2, 2)
    even, odd = pairs.unbind(-1)                                                  # (B, T, H, Dh/2) each
    cos, sin = cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]               # (T, 1, Dh/2): shared by heads
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)                                        # (B, T, H, Dh)
