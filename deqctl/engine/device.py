"""Device choice, with the reason printed so a silent CPU fallback never surprises anyone."""

from __future__ import annotations

import contextlib

import torch


class DeviceError(RuntimeError):
    """runtime.device names a device this machine does not have."""


def budget_threads(threads: int | None, workers: int) -> str:
    """Share the cores between torch's threads and `workers` data-loading processes (two
    torch processes each using every core slow each other down ~8x); returns what was
    chosen, for the device line. runtime.threads (`threads`) wins when set; else, with
    workers, torch keeps max(1, its default - workers) intra-op threads and one inter-op
    thread, and each worker one thread (deqctl.data.loader); without, torch's defaults."""
    if threads:
        torch.set_num_threads(threads)
    elif workers:
        torch.set_num_threads(max(1, torch.get_num_threads() - workers))
    if workers:
        with contextlib.suppress(RuntimeError):   # settable once, before any parallel work
            torch.set_num_interop_threads(1)
    n = torch.get_num_threads()
    text = f"{n} thread{'s' if n != 1 else ''}"
    return text + (f" + {workers} data worker{'s' if workers != 1 else ''} of 1 thread"
                   if workers else "")


def pick_device(setting: str, threads: str | None = None) -> tuple[torch.device, str]:
    """Return (device, reason) for runtime.device = auto | cpu | cuda | mps; `threads`
    (budget_threads' text) is said on the CPU, and beside a GPU when it names workers."""
    threads = threads or f"{torch.get_num_threads()} threads"
    beside = f"; {threads}" if "worker" in threads else ""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if setting == "auto":
        if cuda:
            return torch.device("cuda"), (f"auto: CUDA available "
                                          f"({torch.cuda.get_device_name(0)}){beside}")
        if mps:
            return torch.device("mps"), f"auto: Apple MPS available, no CUDA{beside}"
        return torch.device("cpu"), f"auto: no CUDA or MPS, using CPU ({threads})"
    if setting == "cuda" and not cuda:
        raise DeviceError("runtime.device=cuda but torch sees no CUDA device; use runtime.device=auto")
    if setting == "mps" and not mps:
        raise DeviceError("runtime.device=mps but MPS is not available; use runtime.device=auto")
    return torch.device(setting), f"runtime.device={setting}" + (
        f" ({threads})" if setting == "cpu" else beside)


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context for runtime.precision (fp32: none). Solvers keep their state,
    residuals and adjoint solves in float32 whatever the cell computes in."""
    low = LOW_PRECISION.get(precision)
    return torch.autocast(device.type, dtype=low) if low else contextlib.nullcontext()
