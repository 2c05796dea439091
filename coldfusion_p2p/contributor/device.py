"""Where a contributor computes and in what precision: ``--device`` resolved, autocast, the grad scaler.

Volunteers mostly have a GPU and expect it to be used, so ``auto`` takes CUDA when torch sees one.
A device that was asked for but is not there is a clear error, never a silent fall back to the CPU
(that would make a volunteer's round ten times slower without a word). Mixed precision is torch's
autocast: ``bf16`` needs no loss scaling; ``fp16`` gets a gradient scaler, since its narrow range
underflows small gradients. Weights and optimizer state stay fp32 either way, so fused bodies are
fp32 like everyone else's (hivemind's averager works on CPU fp32 tensors: see
:mod:`~coldfusion_p2p.swarm.fusion` for the device-to-host copies).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from coldfusion_p2p.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(requested: str, *, cuda_devices: int, mps_available: bool) -> torch.device:
    """The device ``--device requested`` means on a machine with ``cuda_devices`` GPUs (pure)."""
    if not DEVICE_PATTERN.match(requested):
        raise UserError(f"unknown --device {requested!r}", "use auto, cpu, cuda, cuda:N or mps")
    if requested == "auto":
        return torch.device("cuda:0" if cuda_devices else "cpu")
    if requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        if cuda_devices == 0:
            raise UserError(
                f"--device {requested} was asked for, but torch sees no CUDA GPU (no driver, or a CPU-only torch)",
                "use --device cpu (or auto), or install a CUDA build of torch",
            )
        if index >= cuda_devices:
            raise UserError(
                f"--device {requested}: this machine has {cuda_devices} CUDA GPU(s), numbered from 0",
                f"use --device cuda:0 ... cuda:{cuda_devices - 1}",
            )
        return torch.device(f"cuda:{index}")
    if requested == "mps" and not mps_available:
        raise UserError("--device mps was asked for, but Apple's MPS backend is not available", "use --device cpu")
    return torch.device(requested)


def available_device(requested: str) -> torch.device:
    """:func:`resolve_device` on this machine."""
    mps = getattr(torch.backends, "mps", None)
    return resolve_device(
        requested,
        cuda_devices=torch.cuda.device_count(),
        mps_available=bool(mps is not None and mps.is_available()),
    )


def check_precision(device: torch.device, precision: str) -> None:
    """A UserError when ``precision`` cannot run on ``device`` (bf16 needs an Ampere or newer GPU)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: the GPU {device} does not support bfloat16", "use --precision fp16")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Forward passes in ``precision`` (fp32: as they are)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16 (None otherwise): keeps small gradients from underflowing to zero."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
