"""GPU preflight and precision choice, simulated (no GPU here): a 1080 Ti on a CUDA 13 build is refused."""

import pytest
import torch

from fer_ray import engine, gpu
from fer_ray.config import TrainConfig

CUDA13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("cap,ok", [((6, 1), False), ((7, 5), True), ((8, 6), True), ((8, 9), True), ((12, 0), True)])
def test_arch_support(cap, ok):
    assert gpu.arch_supported(cap, CUDA13) is ok


def test_ptx_covers_newer_gpus():
    assert gpu.arch_supported((13, 0), ["sm_90", "compute_90"])
    assert not gpu.arch_supported((13, 0), ["sm_90"])


def test_preflight_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce GTX 1080 Ti")
    with pytest.raises(gpu.UnsupportedGPUError, match=r"GTX 1080 Ti, compute capability 6\.1\) is not supported"):
        gpu.preflight(torch.device("cuda", 0))
    gpu.preflight(torch.device("cpu"))


@pytest.mark.parametrize("cap,bf16,expected", [((6, 1), False, None), ((8, 6), True, torch.bfloat16),
                                                ((7, 5), False, torch.float16)])
def test_amp_only_on_tensor_core_gpus(monkeypatch, cap, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert engine.autocast_dtype(TrainConfig(), torch.device("cuda", 0)) is expected
    assert engine.autocast_dtype(TrainConfig(amp="off"), torch.device("cuda", 0)) is None
