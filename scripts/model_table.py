"""Print the model zoo as a Markdown table: family, default input, params and GMACs (fvcore) at several sizes.

Usage: ``python scripts/model_table.py [--sizes 48 96 224] [--timm resnet50 ...] [--pattern 'resnet*']``.
Every model is built with ``pretrained=False``; a size a model cannot be built or run at shows as "—".
"""

from __future__ import annotations

import argparse

from fer_ray.flops import count_gmacs, count_params
from fer_ray.models import create_model, list_models, model_cfg

TIMM_MODELS = ("resnet34", "resnet50", "resnet101", "visformer_small", "vit_base_patch16_224",
               "vit_base_r50_s16_224", "efficientnet_b0")
DASH = "—"


def gmacs_at(name: str, img_size: int) -> str:
    """GMACs of ``name`` built for ``img_size`` px, or "—" when it cannot be built or run at that size."""
    try:
        return f"{count_gmacs(create_model(name, img_size=img_size)):.3g}"
    except Exception:  # noqa: BLE001  (any failure means the size is not supported)
        return DASH


def row(name: str, sizes: list[int]) -> list[str]:
    """One table row: name, family, default input, params (M) at the default size, GMACs per size, description."""
    cfg = model_cfg(name)
    params = count_params(create_model(name)) / 1e6
    return [f"`{name}`", cfg.family, f"{cfg.in_chans}×{cfg.img_size}×{cfg.img_size}", f"{params:.2f}",
            *(gmacs_at(name, s) for s in sizes), cfg.description]


def markdown(rows: list[list[str]], sizes: list[int]) -> str:
    """Render rows under the table header."""
    header = ["model", "family", "default input", "params (M)", *(f"GMACs @{s}" for s in sizes), "description"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 224], help="input sizes to cost")
    parser.add_argument("--pattern", default="*", help="registered models to list (shell wildcard)")
    parser.add_argument("--timm", nargs="*", default=list(TIMM_MODELS), help="timm models to add as timm/<name>")
    args = parser.parse_args(argv)
    names = list_models(args.pattern) + [f"timm/{n}" for n in args.timm]
    print(markdown([row(n, args.sizes) for n in names], args.sizes))


if __name__ == "__main__":
    main()
