"""Helpers shared by the coredi_kernels ops: Triton availability, interpreter detection, launch heuristics.

Nothing here assumes a GPU: sizes come from the tensors, device properties are queried only for CUDA devices.
"""
import functools
import importlib.util
import os
from typing import NamedTuple

import torch

# Dtypes the Triton kernels load and store; all arithmetic inside them is fp32.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A row is held in registers as one power-of-two block: beyond this many columns it would spill.
MAX_TRITON_COLUMNS = 16384


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when the `triton` package can be imported (CPU-only torch builds may lack it)."""
    return importlib.util.find_spec("triton") is not None


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, read by triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one at a time)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


def rows_per_backward_program(rows: int, block: int, device: torch.device, min_rows: int, programs_per_sm: int,
                              groups: int = 1) -> int:
    """Rows per program for a row-wise backward whose `groups` independent groups of `rows` rows each are split into
    programs that write fp32 partial sums: enough programs to fill the GPU (`programs_per_sm` per SM over all
    groups), each at least `min_rows` rows so its partials stay cheap; rounded up to a multiple of `block`. On the
    interpreter, one program per group (its cost grows with the number of programs)."""
    if device.type != "cuda":
        per_program = rows
    else:
        per_program = max(min_rows, cdiv(rows, cdiv(programs_per_sm * num_sms(device), groups)))
    return cdiv(max(min(per_program, rows), 1), block) * block


class RowTileConfig(NamedTuple):
    """How a row-wise kernel tiles a (rows, D) problem: BLOCK_M rows × BLOCK_D (>= D, power of two) columns."""

    BLOCK_M: int
    BLOCK_D: int
    num_warps: int


def row_tile_config(
    n_cols: int, tile_elements: int, elements_per_thread: int = 16, max_block_m: int = 64
) -> RowTileConfig:
    """Pick a tile for kernels that keep whole rows in registers.

    A row of `n_cols` is padded to BLOCK_D = next_power_of_2(n_cols) (tl.arange needs a power of two; masks cover
    the padding, so the padded lanes cost registers but no memory traffic). Rows are stacked until a tile holds
    about `tile_elements` values, so that small D still gives each program enough bytes in flight. num_warps is
    chosen so each thread holds ~`elements_per_thread` values (8 bf16 values are one 16-byte vector load).
    """
    block_d = next_power_of_2(n_cols)
    block_m = _previous_power_of_2(max(1, min(max_block_m, tile_elements // block_d)))
    num_warps = _previous_power_of_2(max(1, min(16, block_m * block_d // (32 * elements_per_thread))))
    return RowTileConfig(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)


def _previous_power_of_2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)
