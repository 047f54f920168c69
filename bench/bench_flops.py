"""Benchmark 5: achieved training FLOP/s. For each model, training images/s through fer_ray's engine (batched
augmentation + forward + backward + AdamW step) × fvcore GMACs × 2 (FLOPs per MAC) × 3 (forward + backward
≈ 3× forward), against the fp32 ``torch.mm`` peak measured in the same process on the same threads. ``--amp bf16``
also trains each model under ``torch.autocast`` bf16, as ``train.amp: bf16`` does (on CPUs with avx512_bf16 or AMX,
oneDNN's bf16 kernels), and reports its images/s against the fp32 run of the same process."""

from __future__ import annotations

import torch
from common import emit, parser, timed

from fer_ray import engine
from fer_ray.config import TrainConfig
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.flops import count_gmacs
from fer_ray.models import create_model

MODELS = ["basic_cnn@48", "deep_cnn_v1@40", "advanced_emotion_net@48", "basic_cnn_bn@48"]


def mm_peak_gflops(n: int, repeat: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / timed(lambda: torch.mm(a, b), repeat) / 1e9


def train_gflops(spec: str, n_images: int, amp: str = "off") -> dict:
    arch, size = spec.split("@")
    torch.manual_seed(0)
    cfg = TrainConfig(model=arch, img_size=int(size), epochs=1, batch_size=64, lr=1e-3, optimizer="adamw",
                      amp=amp)
    model = create_model(arch, img_size=int(size))
    gmacs = count_gmacs(model, img_size=int(size))
    model = model.to(memory_format=torch.channels_last)  # as fer_ray.train lays it out for training
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    opt = engine.build_optimizer(cfg, model.parameters())
    x = torch.randint(0, 256, (n_images, 48, 48), dtype=torch.uint8)
    y = torch.randint(0, 7, (n_images,))
    engine.train_one_epoch(model, x[:128], y[:128], opt, pre, aug, cfg, 0)  # warm-up
    dt = timed(lambda: engine.train_one_epoch(model, x, y, opt, pre, aug, cfg, 0))
    ips = n_images / dt
    return {"model": spec, "gmacs": gmacs, "img_per_s": ips, "gflops": gmacs * 2 * 3 * ips}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=MODELS, help="arch@img_size entries")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16: also train each model under bf16 autocast, after its fp32 run in the same process")
    args = p.parse_args()
    peak = mm_peak_gflops(256 if args.smoke else 2048, 1 if args.smoke else 5)
    models = args.models[:1] if args.smoke else args.models
    n = 64 if args.smoke else 2048  # smoke: one batch of 64, so the warm-up and the timed pass are one step each
    rows = [train_gflops(m, n) for m in models]
    for r in rows:
        r["fraction_of_mm_peak"] = r["gflops"] / peak
        if args.amp != "off":  # the fraction of an fp32 peak means little for bf16: the ratio to fp32 is the figure
            r[f"{args.amp}_img_per_s"] = train_gflops(r["model"], n, args.amp)["img_per_s"]
            r[f"{args.amp}_speedup"] = r[f"{args.amp}_img_per_s"] / r["img_per_s"]
    best = max(r["fraction_of_mm_peak"] for r in rows)
    emit("flops", {"amp": args.amp, "mm_peak_gflops": peak, "models": rows, "best_fraction": best,
                   "target": ">= 0.60 of torch.mm peak"}, args)


if __name__ == "__main__":
    main()
