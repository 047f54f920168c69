"""Every registered model survives one DDP step with 2 CPU (gloo) workers, and the ranks stay in sync.

Two processes are spawned once for the whole registry (spawning per model would cost ~5 s each). Each rank
builds every model with the same seed, feeds it a different random batch, takes one SGD step through
``DistributedDataParallel`` and records a checksum of its parameters; DDP averages the gradients, so both ranks
must end with identical weights. Models whose default input is larger than 64 px run at 64 px here (the test's
reduced config, as in tests/test_models.py), and BatchNorm layers see a batch of 2 per rank.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fer_ray.models import create_model, list_models, model_cfg

pytestmark = pytest.mark.subprocess  # two gloo ranks in spawned processes
MODELS = list_models()
SMALL = 64


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name in MODELS:
        try:
            torch.manual_seed(0)
            model = create_model(name, img_size=min(model_cfg(name).img_size, SMALL)).train()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            cfg = model.fer_cfg
            g = torch.Generator().manual_seed(100 + rank)
            x = torch.randn(2, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            F.cross_entropy(ddp(x), torch.tensor([rank, 6 - rank])).backward()
            opt.step()
            results[name] = float(sum(p.detach().double().sum() for p in model.parameters()))
        except Exception as e:  # recorded per model, so one failure names itself instead of hanging the group
            results[name] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", MODELS)
def test_one_ddp_step_keeps_ranks_in_sync(ddp_results, name):
    r0, r1 = ddp_results[0][name], ddp_results[1][name]
    assert isinstance(r0, float), r0
    assert isinstance(r1, float), r1
    assert r0 == pytest.approx(r1, rel=1e-9, abs=1e-6)
