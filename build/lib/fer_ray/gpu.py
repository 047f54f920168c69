"""GPU preflight and inventory: refuse a GPU the installed torch build has no kernels for, with one clear error.

torch 2.14.1's CUDA 13 wheels ship kernels for sm_75 and newer, so a GTX 1080 Ti (sm_61) fails deep inside
the first convolution with "no kernel image is available". Each training worker calls ``preflight`` first and
fails fast instead, naming the GPU, its compute capability and what the build supports. Precision per device
is decided in ``fer_ray.engine.amp_rule`` (bf16 on sm_80+, fp16 + GradScaler on sm_70/75, fp32 below);
``accelerator_type`` names the GPU the way Ray does, for the per-type batch caps of ``fer_ray.placement``.

``inventory`` is the one place fer_ray reads the machine's GPUs (NVML, in PCI bus order: the order
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` gives CUDA, so its indices are ``CUDA_VISIBLE_DEVICES`` values), for the local node
plan of ``fer_ray.nodes``. Test hook: ``FER_RAY_FAKE_GPUS`` (a JSON list of ``{"name", "capability", "memory_gb"}``)
replaces the machine's GPUs, and ``FER_RAY_FAKE_ARCHS`` (``sm_61,sm_86``) the installed torch's kernel list.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: reading the inventory of a GPU-less machine needs none
    import torch

FAKE_GPUS_ENV = "FER_RAY_FAKE_GPUS"
"""Test hook: a JSON list of GPUs (``name``, ``capability`` ``[major, minor]``, ``memory_gb``) that ``inventory``
returns instead of the machine's (indices in list order)."""
FAKE_ARCHS_ENV = "FER_RAY_FAKE_ARCHS"
"""Test hook: the kernel list (``sm_61,sm_86``) ``inventory`` checks GPUs against instead of the installed torch's."""


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
    import torch

    cap = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    if not arch_supported(cap, archs):
        name = torch.cuda.get_device_name(device)
        raise UnsupportedGPUError(
            f"GPU {device.index} ({name}, compute capability {cap[0]}.{cap[1]}) is not supported by torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}; kernels for {', '.join(archs)}); run it with a torch "
            f"build that includes sm_{cap[0]}{cap[1]} (e.g. a CUDA 12.6 wheel) on every rank, or keep trials off "
            f"this GPU with ScalingConfig accelerator_type / CUDA_VISIBLE_DEVICES")


def ray_type_name(name: str) -> str | None:
    """Ray's accelerator type name for a GPU's marketing name (``NVIDIA GeForce RTX 3090`` → ``GeForce-RTX-3090``)."""
    # Private, but the one place Ray's own naming lives (tests/test_ray_internals.py pins it).
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(name)


def accelerator_type(device: torch.device) -> str | None:
    """Ray's accelerator type name for a CUDA device (``GeForce-RTX-3090``, ``A100``), ``None`` for the CPU."""
    if device.type != "cuda":
        return None
    import torch

    return ray_type_name(torch.cuda.get_device_name(device))


@dataclasses.dataclass(frozen=True)
class GPUInfo:
    """One GPU of this machine, as ``inventory`` reads it."""

    index: int
    """NVML's index: PCI bus order, the ``CUDA_VISIBLE_DEVICES`` value under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``."""
    name: str
    accelerator_type: str
    """Ray's name for it (``GeForce-GTX-1080-Ti``): its ``accelerator_type:<X>`` resource."""
    capability: tuple[int, int]
    memory_gb: float
    supported: bool
    """Whether the installed torch has kernels for it (``arch_supported``)."""
    archs: tuple[str, ...] = ()
    """The kernel list ``supported`` was decided against (the installed torch's)."""

    def left_out_line(self) -> str:
        """The one line that says this GPU is left out, and the fix."""
        import torch

        major, minor = self.capability
        kernels = f"kernels for {', '.join(self.archs)}" if self.archs else "no CUDA kernels"
        return (f"GPU {self.index} ({self.name}, compute capability {major}.{minor}) left out: torch "
                f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}) has {kernels}, not sm_{major}{minor}; "
                f"to train on it, install a torch build with sm_{major}{minor} kernels (e.g. the CUDA 12.6 wheel: "
                f"pip install torch --index-url https://download.pytorch.org/whl/cu126) for the whole box")


def torch_archs() -> list[str]:
    """The installed torch's kernel list (``FER_RAY_FAKE_ARCHS`` in tests)."""
    fake = os.environ.get(FAKE_ARCHS_ENV)
    if fake is not None:
        return [a.strip() for a in fake.split(",") if a.strip()]
    import torch

    return torch.cuda.get_arch_list()


def _nvml_gpus() -> list[dict]:
    """The machine's GPUs through NVML (Ray's copy of pynvml), PCI bus order; none without an NVIDIA driver."""
    import ray._private.thirdparty.pynvml as nvml

    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return []
    try:
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            out.append({"name": name.decode() if isinstance(name, bytes) else name,
                        "capability": list(nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                        "memory_gb": round(nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 1)})
        return out
    finally:
        nvml.nvmlShutdown()


def _fake_gpus(text: str) -> list[dict]:
    from fer_ray.config import ConfigError

    try:
        gpus = json.loads(text)
        if not isinstance(gpus, list):
            raise ValueError("not a list")
        for g in gpus:
            if not (isinstance(g, dict) and isinstance(g.get("name"), str) and len(g.get("capability", ())) == 2):
                raise ValueError(f"{g!r} lacks a name or a capability [major, minor]")
        return gpus
    except ValueError as e:
        raise ConfigError(f"{FAKE_GPUS_ENV}: a JSON list of {{\"name\", \"capability\": [major, minor], "
                          f"\"memory_gb\"}} objects expected ({e})") from None


def inventory(gpus: list[dict] | None = None, archs: list[str] | None = None) -> list[GPUInfo]:
    """This machine's GPUs: index, name, Ray accelerator type, compute capability, memory, and whether the
    installed torch can drive each (``arch_supported``). ``gpus``/``archs`` (or ``FER_RAY_FAKE_GPUS`` /
    ``FER_RAY_FAKE_ARCHS``) stand in for the machine's GPUs and torch's kernel list."""
    if gpus is None:
        fake = os.environ.get(FAKE_GPUS_ENV)
        gpus = _fake_gpus(fake) if fake is not None else _nvml_gpus()
    if not gpus:
        return []
    archs = torch_archs() if archs is None else archs
    out = []
    for i, g in enumerate(gpus):
        cap = (int(g["capability"][0]), int(g["capability"][1]))
        out.append(GPUInfo(index=int(g.get("index", i)), name=g["name"], accelerator_type=ray_type_name(g["name"]),
                           capability=cap, memory_gb=float(g.get("memory_gb", 0)),
                           supported=arch_supported(cap, archs), archs=tuple(archs)))
    return out
