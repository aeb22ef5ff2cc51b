"""Argument checks shared by every public op: each error names the argument at fault."""

import math
import numbers

import torch


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_float_tensor(name: str, value) -> torch.Tensor:
    require_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def require_mask(name: str, value, shape: torch.Size) -> torch.Tensor:
    """Returns the mask as bool; accepts bool or integer dtypes of exactly `shape`."""
    require_tensor(name, value)
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be a bool or integer tensor, got {value.dtype}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value if value.dtype == torch.bool else value != 0


def require_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def require_real_in(name: str, value, low: float, high: float = math.inf) -> float:
    """A finite real number in [low, high]; infinities are refused even when high is inf.

    While torch.compile traces, a float argument may be symbolic (dynamic=True): its value
    is unknown then, and the op's own kernel checks it when the graph runs.
    """
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if not (low <= value <= high):
        bounds = f"[{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return float(value)


def require_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def require_finite(name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Raises if an element of `values` (selected by `where`, if given) is NaN or Inf; one sync."""
    if values.numel() == 0:
        return
    finite = torch.isfinite(values)
    if where is not None:
        finite.logical_or_(~where)
    if not bool(finite.all()):
        scope = " where score_mask is set" if where is not None else ""
        raise ValueError(f"{name} must be finite{scope} (found NaN or Inf)")


def require_int(name: str, value, low: int, high: int | None = None) -> int:
    """An integer (Python or NumPy; bool refused) in [low, high]; returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def require_token_ids(name: str, value) -> torch.Tensor:
    """A [B, T] tensor of the dtypes an embedding lookup takes (int64 or int32)."""
    require_tensor(name, value)
    if value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must have dtype int64 or int32, got {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(value.shape)}")
    return value
