"""--device and --precision: what a flag means on a given machine, and clear errors for absent hardware."""

from __future__ import annotations

import pytest
import torch

from coldfusion_p2p.contributor.device import autocast, grad_scaler, resolve_device
from coldfusion_p2p.errors import UserError


def test_auto_takes_the_first_gpu_when_there_is_one_and_the_cpu_otherwise():
    assert resolve_device("auto", cuda_devices=0, mps_available=True) == torch.device("cpu")
    assert resolve_device("auto", cuda_devices=2, mps_available=False) == torch.device("cuda:0")
    assert resolve_device("cuda", cuda_devices=2, mps_available=False) == torch.device("cuda:0")
    assert resolve_device("cuda:1", cuda_devices=2, mps_available=False) == torch.device("cuda:1")
    assert resolve_device("cpu", cuda_devices=2, mps_available=True) == torch.device("cpu")
    assert resolve_device("mps", cuda_devices=0, mps_available=True) == torch.device("mps")


@pytest.mark.parametrize(
    ("requested", "cuda_devices", "mps", "fragments"),
    [
        ("cuda", 0, False, ("--device cuda was asked for", "no CUDA GPU", "use --device cpu")),
        ("cuda:2", 2, False, ("has 2 CUDA GPU(s)", "cuda:0 ... cuda:1")),
        ("mps", 0, False, ("MPS backend is not available",)),
        ("gpu", 1, False, ("unknown --device 'gpu'", "auto, cpu, cuda, cuda:N or mps")),
    ],
)
def test_hardware_that_is_not_there_is_a_clear_error_never_a_silent_cpu(requested, cuda_devices, mps, fragments):
    with pytest.raises(UserError) as raised:
        resolve_device(requested, cuda_devices=cuda_devices, mps_available=mps)
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))


def test_autocast_computes_in_the_asked_precision_and_fp16_alone_gets_a_scaler():
    cpu, weights = torch.device("cpu"), torch.randn(4, 4)
    with autocast(cpu, "bf16"):
        assert (torch.randn(2, 4) @ weights).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (torch.randn(2, 4) @ weights).dtype == torch.float32
    assert grad_scaler(cpu, "fp16") is not None and grad_scaler(cpu, "bf16") is None
