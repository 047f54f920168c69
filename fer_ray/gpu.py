"""GPU preflight: refuse a GPU the installed torch build has no kernels for, with one clear error.

torch 2.14.1's CUDA 13 wheels ship kernels for sm_75 and newer, so a GTX 1080 Ti (sm_61) fails deep inside
the first convolution with "no kernel image is available". Each training worker calls ``preflight`` first and
fails fast instead, naming the GPU, its compute capability and what the build supports. Precision per device
is decided in ``fer_ray.engine.amp_rule`` (bf16 on sm_80+, fp16 + GradScaler on sm_70/75, fp32 below);
``accelerator_type`` names the GPU the way Ray does, for the per-type batch caps of ``fer_ray.placement``.
"""

from __future__ import annotations

import torch


class UnsupportedGPUError(RuntimeError):
    """The GPU's compute capability has no kernels in this torch build."""


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """True if a cubin for the same major version (minor <= the device's) or PTX for <= capability is present."""
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def preflight(device: torch.device) -> None:
    """Raise ``UnsupportedGPUError`` if ``device`` is a GPU this torch build cannot run on."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    if not arch_supported(cap, archs):
        name = torch.cuda.get_device_name(device)
        raise UnsupportedGPUError(
            f"GPU {device.index} ({name}, compute capability {cap[0]}.{cap[1]}) is not supported by torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}; kernels for {', '.join(archs)}); run it with a torch "
            f"build that includes sm_{cap[0]}{cap[1]} (e.g. a CUDA 12.6 wheel) on every rank, or keep trials off "
            f"this GPU with ScalingConfig accelerator_type / CUDA_VISIBLE_DEVICES")


def accelerator_type(device: torch.device) -> str | None:
    """Ray's accelerator type name for a CUDA device (``GeForce-RTX-3090``, ``A100``), ``None`` for the CPU."""
    if device.type != "cuda":
        return None
    # Private, but the one place Ray's own naming lives (tests/test_ray_internals.py pins it).
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(torch.cuda.get_device_name(device))
