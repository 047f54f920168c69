"""A whitened first layer (airbench's ``init_whitening_conv``): the stem conv's filters set, once before training,
to the scaled eigenvectors of the covariance of its input patches, estimated on a sample of the training split on
the training device; frozen or left to train (``TrainConfig.whiten``).

A model declares its stem by a ``stem_conv()`` method returning the ``nn.Conv2d`` that sees the input
(``airbench_fer``, ``resnet18_fer``, ``resnet_fer``). For a ``k×k`` stem over ``C`` channels the ``d = C·k²``
eigenvectors ``v`` (largest eigenvalue ``λ`` first) give the filters ``±v / sqrt(λ + eps)``, in pairs: a stem with
``2d`` filters (airbench's width) gets exactly them, a narrower one the leading pairs, a wider one keeps its own
initialisation beyond the first ``2d`` (``frozen`` freezes the whole weight). The patches are those the conv sees:
the model's preprocessed input, unpadded, at the conv's stride; the covariance is taken about zero (airbench's),
in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_ray.config import WhitenConfig


def stem_conv(model: nn.Module) -> nn.Conv2d | None:
    """The conv a model declares as its stem (``model.stem_conv()``), or ``None``."""
    declare = getattr(model, "stem_conv", None)
    return declare() if callable(declare) else None


def patch_covariance(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``[d, d]`` second moment (float64) of the ``kernel``-sized patches of ``x`` ``[B, C, H, W]``, ``d = C·kh·kw``,
    in ``F.unfold``'s (= ``Conv2d.weight``'s) element order."""
    patches = F.unfold(x.float(), kernel, stride=stride)  # [B, d, L]
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return flat.T @ flat / max(1, len(flat))


def whitening_filters(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """``[2d, d]`` filters ``+v1, −v1, +v2, −v2, …`` with ``v / sqrt(λ + eps)`` for the eigenpairs of ``cov``
    (``torch.linalg.eigh``), largest eigenvalue first."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    scaled = (eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)).T  # [d, d]: row i is v_i / sqrt(λ_i + eps)
    return torch.stack([scaled, -scaled], dim=1).reshape(2 * len(scaled), -1)


@torch.no_grad()
def whiten_stem(model: nn.Module, images, preprocess: nn.Module, cfg: WhitenConfig, seed: int = 0,
                batch: int = 256) -> torch.Tensor:
    """Set ``model``'s stem filters to the whitening filters of ``cfg.images`` training images (drawn with
    ``seed``) as ``preprocess`` feeds them; freeze them with ``cfg.frozen``. Returns the eigenvalues (descending).

    ``images``: the uint8 training images (a tensor or ``engine.IndexedImages``) on the training device.
    """
    conv = stem_conv(model)
    if conv is None:
        raise ValueError(f"whiten needs a model that declares its stem conv (stem_conv()); "
                         f"{getattr(model, 'fer_cfg', {}).get('arch', type(model).__name__)} has none")
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("whiten: the stem conv must be a plain (groups=1, dilation=1) convolution")
    n = len(images)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cfg.images]
    cov = None
    for i in range(0, len(pick), batch):
        x = preprocess(images[pick[i:i + batch].to(images.device)])
        part = patch_covariance(x, conv.kernel_size, conv.stride) * len(pick[i:i + batch])
        cov = part if cov is None else cov + part
    cov = cov / len(pick)
    filters = whitening_filters(cov, cfg.eps)
    out = min(conv.out_channels, len(filters))
    conv.weight[:out] = filters[:out].view(out, *conv.weight.shape[1:]).to(conv.weight)
    if conv.bias is not None:
        conv.bias.zero_()
    conv.weight.requires_grad_(not cfg.frozen)
    return torch.linalg.eigvalsh(cov).flip(0)
