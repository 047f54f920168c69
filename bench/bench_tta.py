"""Benchmark 6: TTA evaluation with 8 views — fer_ray's stacked multi-view forward vs a per-view Python loop
over the same model, images and views, in the same process (outputs checked equal)."""

from __future__ import annotations

import torch
from common import emit, parser, timed

from fer_ray.models import create_model
from fer_ray.tta import tta_logits, tta_logits_loop

VIEWS = ["identity", "hflip", "rot10", "rot-10", "shift2,0", "shift-2,0", "hflip+rot10", "hflip+rot-10"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default=None, help="default advanced_emotion_net (smoke: basic_cnn, the cheapest)")
    args = p.parse_args()
    n = 16 if args.smoke else 2048
    model_name = args.model or ("basic_cnn" if args.smoke else "advanced_emotion_net")
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    images = torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8)
    assert torch.allclose(tta_logits(model, images[:32], VIEWS), tta_logits_loop(model, images[:32], VIEWS),
                          atol=1e-3)
    repeat = 1 if args.smoke else 2
    # Smoke: batch sizes below n, so both paths still run more than one batch.
    loop_batch, ours_batch = (8, 64) if args.smoke else (256, 1024)
    t_loop = timed(lambda: tta_logits_loop(model, images, VIEWS, batch_size=loop_batch), repeat)
    t_ours = timed(lambda: tta_logits(model, images, VIEWS, batch_size=ours_batch), repeat)
    emit("tta", {"model": model_name, "images": n, "views": len(VIEWS), "loop_s": t_loop, "fer_ray_s": t_ours,
                 "speedup": t_loop / t_ours, "target": ">= 2x"}, args)


if __name__ == "__main__":
    main()
