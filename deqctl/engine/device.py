"""Device choice, with the reason printed so a silent CPU fallback never surprises anyone."""

from __future__ import annotations

import contextlib

import torch


class DeviceError(RuntimeError):
    """runtime.device names a device this machine does not have."""


def budget_threads(threads: int | None, workers: int, device: torch.device) -> str:
    """Share the cores between torch's threads and `workers` data-loading processes of one
    thread each (deqctl.data.loader); returns what was chosen, for the device line.
    runtime.threads (`threads`) wins when set. Else on the CPU torch keeps every core: a
    worker decodes a batch ahead and then sleeps, while the model computes all the time; on
    2 cores, torch at 1 thread beside 2 workers decoding JPEGs took 1.58x the ms/step it
    takes at 2 threads, 1.25x per solver evaluation (bench/train_speed.py --only decoding). Beside a GPU the model's work
    is the GPU's and the workers' decoding is the CPU's: torch keeps max(1, cores - workers).
    With workers torch keeps one inter-op thread (two torch processes each using every core
    slow each other several-fold; the workers are the other processes here)."""
    if threads:
        torch.set_num_threads(threads)
    elif workers and device.type != "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() - workers))
    if workers:
        with contextlib.suppress(RuntimeError):   # settable once, before any parallel work
            torch.set_num_interop_threads(1)
    n = torch.get_num_threads()
    text = f"{n} thread{'s' if n != 1 else ''}"
    return text + (f" + {workers} data worker{'s' if workers != 1 else ''} of 1 thread"
                   if workers else "")


def pick_device(setting: str) -> tuple[torch.device, str]:
    """Return (device, reason) for runtime.device = auto | cpu | cuda | mps."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if setting == "auto":
        if cuda:
            return torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        if mps:
            return torch.device("mps"), "auto: Apple MPS available, no CUDA"
        return torch.device("cpu"), "auto: no CUDA or MPS, using CPU"
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
