"""What an attention call looks like to a backend (`AttentionSignature`) and the backend interface (`AttentionBackend`).

A backend declares what it supports as class attributes (device types, dtypes, compute capabilities, head-dim
limits, package); the base class turns those declarations into readable reasons, and a backend adds its own checks
(torch's verdict, an import, a probe run) in `runtime_reasons`, which only runs when the declared checks pass.
Backends see a signature, not the tensors, so a choice can be made once per kind of call, cached, and made at
trace time under torch.compile (where the tensors are fake).
"""
import functools
import operator
import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

# Storage offsets of q, k, v that are multiples of this many bytes keep vectorized (CUTLASS) loads legal.
ALIGNMENT_BYTES = 16


@dataclass(frozen=True)
class AttentionSignature:
    """Everything the backends' support checks read about one call: q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv).

    capability: CUDA compute capability (major, minor) of `device`, None off CUDA.
    requires_grad: autograd will differentiate the call (grad mode on and an input requires grad).
    """

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    last_dim_contiguous: bool
    aligned: bool
    requires_grad: bool
    capability: Optional[tuple[int, int]] = None

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, device_capability: Optional[tuple[int, int]] = None):
        """The signature of a call on real tensors; `device_capability` overrides the device's (for tests)."""
        return cls.from_key(call_key(q, k, v), device_capability)

    @classmethod
    def from_key(cls, key: tuple, device_capability: Optional[tuple[int, int]] = None):
        device, dtype, q_shape, k_shape, v_shape, last_dim_contiguous, aligned, requires_grad = key
        capability = None
        if device.type == "cuda":
            capability = device_capability if device_capability is not None else cuda_capability(device.index)
        return cls(
            device=device, dtype=dtype, batch=q_shape[0], heads=q_shape[1], seq_q=q_shape[2], seq_k=k_shape[2],
            head_dim=q_shape[3], head_dim_v=v_shape[3], last_dim_contiguous=last_dim_contiguous, aligned=aligned,
            requires_grad=requires_grad, capability=tuple(capability) if capability is not None else None,
        )

    def describe(self) -> str:
        device = str(self.device)
        if self.capability is not None:
            device += f" (sm{self.capability[0]}{self.capability[1]})"
        shape = (self.batch, self.heads, self.seq_q, self.head_dim)
        grad = "with grad" if self.requires_grad else "no grad"
        return f"q {shape}, Tk={self.seq_k}, {str(self.dtype).removeprefix('torch.')} on {device}, {grad}"


# Under torch.compile, the stand-in for a batch or sequence length that dynamo may have made symbolic (see call_key).
COMPILED_STANDIN_LENGTH = 256


def _compiled_length(n, limit: int) -> int:
    """A batch or sequence length as the compiled key sees it: the facts the backends check about it (length 1,
    above `limit`), else a stand-in. Only comparisons reach dynamo, so a symbolic length is guarded by a relation
    that holds for every size (e.g. `s0 != 1`), never specialized to one value."""
    if n == 1:
        return 1
    return limit + 1 if n > limit else COMPILED_STANDIN_LENGTH


def call_key(q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """A hashable summary of a call, built from tensor metadata only (it is traced by torch.compile as constants).

    Under torch.compile the storage offsets are not known at trace time (Inductor lays out the buffers and keeps
    the attention inputs aligned), so they count as aligned there. Batch and sequence lengths may be symbolic there
    (dynamic shapes, or automatic dynamic after a second shape), and a symbolic int cannot enter the constant key:
    the key keeps what the backends check about them (a length of 1, a batch above the 65535 grid limit) and a
    stand-in length otherwise (`COMPILED_STANDIN_LENGTH`; torch's own verdict is then asked on stand-in tensors of
    that length: its checks concern head dims, dtypes, strides and the device). Heads and head dims come from the
    model's configuration: they are specialized (a guard on their value), so the choice sees them exactly.
    """
    size = q.element_size()
    compiling = torch.compiler.is_compiling()
    if compiling:
        # operator.index specializes a symbolic head count or head dim (dynamo guards on its value; int() would not)
        B, H, Tq, D = q.shape
        batch, heads = _compiled_length(B, 65535), operator.index(H)
        q_shape = (batch, heads, _compiled_length(Tq, 65535), operator.index(D))
        k_shape = (batch, heads, _compiled_length(k.shape[2], 65535), operator.index(k.shape[3]))
        v_shape = k_shape[:3] + (operator.index(v.shape[3]),)
    else:
        q_shape, k_shape, v_shape = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    return (
        q.device,
        q.dtype,
        q_shape,
        k_shape,
        v_shape,
        q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
        compiling or all((t.storage_offset() * size) % ALIGNMENT_BYTES == 0 for t in (q, k, v)),
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )


@functools.lru_cache(maxsize=None)
def cuda_capability(index: Optional[int]) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def is_installed(module: str) -> bool:
    """True when `module` can be found without importing it (importing flash_attn or xformers is slow)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


class AttentionBackend:
    """One way to compute softmax(q kᵀ · scale) v for (B, H, T, D) tensors, without mask or dropout.

    Subclasses set the declarations below and implement `__call__(q, k, v, scale) -> (B, H, Tq, Dv)`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    package: ClassVar[Optional[str]] = None  # a module that must be installed (checked without importing it)
    install_hint: ClassVar[str] = ""
    device_types: ClassVar[tuple[str, ...]] = ("cuda",)
    dtypes: ClassVar[dict[str, tuple[torch.dtype, ...]]] = {"cuda": (torch.float16, torch.bfloat16)}
    min_capability: ClassVar[Optional[tuple[int, int]]] = None  # CUDA only
    max_capability: ClassVar[Optional[tuple[int, int]]] = None
    max_head_dim: ClassVar[Optional[int]] = None
    head_dim_multiple: ClassVar[int] = 1
    needs_contiguous_last_dim: ClassVar[bool] = True
    needs_equal_head_dims: ClassVar[bool] = True

    def not_supported_reasons(
        self, q: Tensor, k: Tensor, v: Tensor, *, device_capability: Optional[tuple[int, int]] = None
    ) -> list[str]:
        """Why this backend cannot run attention(q, k, v); an empty list means it can."""
        return self.reasons(AttentionSignature.of(q, k, v, device_capability))

    def reasons(self, sig: AttentionSignature) -> list[str]:
        """Declared checks first; the runtime checks (imports, torch's own checks, probes) only if those pass."""
        found = self.declared_reasons(sig)
        return found if found else self.runtime_reasons(sig)

    def declared_reasons(self, sig: AttentionSignature) -> list[str]:
        found = []
        if self.package is not None and not is_installed(self.package):
            found.append(f"`{self.package}` is not installed{self.install_hint}")
        if sig.device.type not in self.device_types:
            found.append(f"runs on {'/'.join(self.device_types)} tensors, the inputs are on {sig.device.type}")
            return found  # the remaining checks are per device type
        dtypes = self.dtypes.get(sig.device.type, ())
        if sig.dtype not in dtypes:
            found.append(f"dtype {str(sig.dtype).removeprefix('torch.')} is not one of {_dtype_names(dtypes)}")
        if sig.device.type == "cuda" and sig.capability is not None:
            found += self._capability_reasons(sig.capability)
        if self.needs_equal_head_dims and sig.head_dim != sig.head_dim_v:
            found.append(f"needs equal head dims for q/k and v, got {sig.head_dim} and {sig.head_dim_v}")
        if self.max_head_dim is not None and max(sig.head_dim, sig.head_dim_v) > self.max_head_dim:
            found.append(f"head dim {max(sig.head_dim, sig.head_dim_v)} > {self.max_head_dim}")
        if sig.head_dim % self.head_dim_multiple or sig.head_dim_v % self.head_dim_multiple:
            found.append(f"head dim {sig.head_dim} is not a multiple of {self.head_dim_multiple}")
        if self.needs_contiguous_last_dim and not sig.last_dim_contiguous:
            found.append("q, k and v need stride 1 in the last (head) dimension")
        return found + self.extra_reasons(sig)

    def _capability_reasons(self, capability: tuple[int, int]) -> list[str]:
        sm = f"sm{capability[0]}{capability[1]}"
        if self.min_capability is not None and capability < self.min_capability:
            return [f"needs compute capability >= {self.min_capability[0]}.{self.min_capability[1]}, this GPU is {sm}"]
        if self.max_capability is not None and capability > self.max_capability:
            return [f"needs compute capability <= {self.max_capability[0]}.{self.max_capability[1]}, this GPU is {sm}"]
        return []

    def extra_reasons(self, sig: AttentionSignature) -> list[str]:
        """Backend-specific checks on the signature alone (no imports, no GPU work)."""
        return []

    def runtime_reasons(self, sig: AttentionSignature) -> list[str]:
        """Checks that import packages or run code; called only when the declared checks pass."""
        return []

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention backend {self.name}: {self.summary}>"
