"""Device choice, with the reason printed so a silent CPU fallback never surprises anyone."""

from __future__ import annotations

import contextlib

import torch


class DeviceError(RuntimeError):
    """runtime.device names a device this machine does not have."""


def pick_device(setting: str) -> tuple[torch.device, str]:
    """Return (device, reason) for runtime.device = auto | cpu | cuda | mps."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if setting == "auto":
        if cuda:
            return torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        if mps:
            return torch.device("mps"), "auto: Apple MPS available, no CUDA"
        return torch.device("cpu"), f"auto: no CUDA or MPS, using CPU ({torch.get_num_threads()} threads)"
    if setting == "cuda" and not cuda:
        raise DeviceError("runtime.device=cuda but torch sees no CUDA device; use runtime.device=auto")
    if setting == "mps" and not mps:
        raise DeviceError("runtime.device=mps but MPS is not available; use runtime.device=auto")
    return torch.device(setting), f"runtime.device={setting}"


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context for runtime.precision (fp32: none). Solvers keep their state,
    residuals and adjoint solves in float32 whatever the cell computes in."""
    low = LOW_PRECISION.get(precision)
    return torch.autocast(device.type, dtype=low) if low else contextlib.nullcontext()
