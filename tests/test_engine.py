"""The pure-torch engine: rank sharding, a training epoch that learns, evaluation."""

import pytest
import torch

from fer_ray import engine
from fer_ray.config import TrainConfig
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.models import create_model


def test_shards_are_disjoint_and_equal_sized():
    shards = [torch.cat(list(engine.shard_batches(103, 8, shuffle=True, seed=3, rank=r, world_size=2)))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 48
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_eval_batches_cover_everything_in_order():
    idx = torch.cat(list(engine.shard_batches(10, 4, shuffle=False, drop_last=False)))
    assert idx.tolist() == list(range(10))


def test_training_reduces_loss_on_an_easy_problem():
    torch.manual_seed(0)
    n = 256
    labels = torch.randint(0, 7, (n,))
    images = (labels.view(-1, 1, 1) * 36).to(torch.uint8).expand(n, 48, 48).contiguous()  # brightness = class
    cfg = TrainConfig(model="basic_cnn", epochs=3, batch_size=32, lr=3e-3, augment={"strength": 0, "hflip": 0})
    model = create_model("basic_cnn", img_size=32)
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    opt = engine.build_optimizer(cfg, model.parameters())
    first = engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, 0)
    for epoch in range(1, 4):
        last = engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, epoch)
    assert last["train_loss"] < first["train_loss"]
    assert engine.evaluate(model, images, labels, pre, cfg)["val_acc"] > 0.5


def test_resumed_epoch_draws_what_the_uninterrupted_run_drew():
    """Epoch 2 from a checkpoint of epoch 1 (in a "new process": the global RNG disturbed) gives the same weights
    as epochs 1-2 in one go: batch order, augmentation, dropout and mixup are all seeded by (seed, epoch, rank)."""
    import copy

    n = 128
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 7, (n,), generator=gen)
    cfg = TrainConfig(model="basic_cnn", batch_size=32, mixup=0.2, augment={"rotate": 10.0, "erasing": 0.5})

    def fresh():
        torch.manual_seed(0)
        model = create_model("basic_cnn", img_size=32)  # dropout 0.5: uses the RNG every step
        return model, engine.build_optimizer(cfg, model.parameters())

    pre, aug = Preprocess.for_model(create_model("basic_cnn", img_size=32).fer_cfg), Augment(cfg.augment)
    straight, opt = fresh()
    for epoch in (0, 1):
        engine.train_one_epoch(straight, images, labels, opt, pre, aug, cfg, epoch)
    resumed, opt = fresh()
    engine.train_one_epoch(resumed, images, labels, opt, pre, aug, cfg, 0)
    state, opt_state = copy.deepcopy(resumed.state_dict()), copy.deepcopy(opt.state_dict())
    torch.rand(1000)  # the restarted process's RNG is somewhere else
    resumed, opt = fresh()
    resumed.load_state_dict(state)
    opt.load_state_dict(opt_state)
    engine.train_one_epoch(resumed, images, labels, opt, pre, aug, cfg, 1)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_amp_is_fp32_on_cpu():
    assert engine.autocast_dtype(TrainConfig(), torch.device("cpu")) is None


def test_two_phase_freezes_then_unfreezes():
    torch.manual_seed(0)
    model = create_model("hybrid_effnet", img_size=32, in_chans=1)
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    labels = torch.randint(0, 7, (16,))
    cfg = TrainConfig(model="hybrid_effnet", epochs=2, freeze_epochs=1, batch_size=8, img_size=32, in_chans=1)
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert engine.set_backbone_frozen(model, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head", "classifier", "fc")) for n in trainable), trainable
    opt = engine.build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, 0)
    changed = {k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert changed and all(k.split(".")[0] in {n.split(".")[0] for n in trainable} for k in changed), changed
    engine.set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())
    opt = engine.build_optimizer(cfg, model.parameters())
    mid = {k: v.clone() for k, v in model.state_dict().items()}
    engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, 1)
    backbone = [k for k in mid if k.split(".")[0] not in {n.split(".")[0] for n in trainable}]
    assert any(not torch.equal(model.state_dict()[k], mid[k]) for k in backbone), "backbone trains in phase 2"


def test_recipe_knobs_run():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 20 + [3] * 4 + [6] * 8)
    images = torch.randint(0, 256, (32, 48, 48), dtype=torch.uint8)
    cfg = TrainConfig(model="basic_cnn", batch_size=8, mixup=0.2, cutmix=1.0, class_weighted=True,
                      balanced_sampling=True, label_smoothing=0.1, grad_clip=1.0)
    model = create_model("basic_cnn", img_size=32)
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    out = engine.train_one_epoch(model, images, labels, engine.build_optimizer(cfg, model.parameters()), pre, aug,
                                 cfg, 0)
    assert out["images"] == 32 and out["train_loss"] > 0
    w = engine.class_balance(labels)
    assert w[1] > 0 and w[3] > w[0]  # rare classes weigh more


def test_a_split_view_trains_and_evaluates_exactly_as_its_gathered_copy():
    """``IndexedImages`` (full array + split indices) is what trials train on instead of a private copy of the split."""
    gen = torch.Generator().manual_seed(1)
    full = torch.randint(0, 256, (200, 48, 48), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 7, (200,), generator=gen)
    split = torch.randperm(200, generator=gen)[:120]
    cfg = TrainConfig(model="basic_cnn", batch_size=32, eval_batch_size=50, augment={"rotate": 10.0})
    pre, aug = Preprocess.for_model(create_model("basic_cnn", img_size=32).fer_cfg), Augment(cfg.augment)
    results = []
    for images in (full[split].clone(), engine.IndexedImages(full, split)):
        torch.manual_seed(0)
        model = create_model("basic_cnn", img_size=32)
        out = engine.train_one_epoch(model, images, labels[split], engine.build_optimizer(cfg, model.parameters()),
                                     pre, aug, cfg, 0)
        out |= engine.evaluate(model, images, labels[split], pre, cfg, rank=1, world_size=2)
        results.append(({k: v for k, v in out.items() if k != "train_time_s"}, model.state_dict()))
    (a, wa), (b, wb) = results
    assert a == b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    view = engine.IndexedImages(full, split)
    assert len(view) == 120 and len(view[10:30]) == 20
    assert torch.equal(view[10:30][torch.tensor([0, 19])], full[split[[10, 29]]])


def test_trials_index_the_shared_dataset_in_place():
    """No per-trial copy of the images: both splits index the object store's (read-only) array itself."""
    import numpy as np

    from fer_ray.loop import split_tensors

    images = np.random.default_rng(0).integers(0, 256, (50, 48, 48), dtype=np.uint8)
    images.flags.writeable = False  # as ray.get returns it
    arrays = {"images": images, "labels": np.arange(50) % 7,
              "splits": {"train": np.arange(0, 40), "val": np.arange(40, 50)}}
    splits = split_tensors(arrays, torch.device("cpu"))
    for name, (view, y) in splits.items():
        assert view.base.data_ptr() == images.ctypes.data, name
        assert torch.equal(view[torch.arange(len(view))], torch.from_numpy(images[arrays["splits"][name]]))
        assert y.tolist() == (arrays["splits"][name] % 7).tolist()



@pytest.mark.parametrize("warm", [0, 1, 3])
def test_warmup_cosine_is_torchs_and_matches_the_closed_form(warm):
    """``build_scheduler`` now chains torch's LinearLR and CosineAnnealingLR: per-epoch learning rates equal the
    closed form the project used before (warm-up (k+1)/(w+1), then half a cosine to 0), also across a resume."""
    import math

    cfg = TrainConfig(epochs=10, warmup_epochs=warm, lr=0.1)

    def expected(epoch: int) -> float:
        if epoch < warm:
            return 0.1 * (epoch + 1) / (warm + 1)
        return 0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(1, cfg.epochs - warm)))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = engine.build_scheduler(cfg, opt)
    for epoch in range(cfg.epochs):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected(epoch), rel=1e-9, abs=1e-15), epoch
        opt.step()
        sched.step()
        if epoch == 4:  # a resumed run: fresh optimizer and scheduler, states loaded
            opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            sched2 = engine.build_scheduler(cfg, opt2)
            opt2.load_state_dict(opt.state_dict())
            sched2.load_state_dict(sched.state_dict())
            opt, sched = opt2, sched2


def test_class_weights_are_sklearns_and_match_inverse_frequency():
    labels = torch.tensor([0] * 20 + [3] * 4 + [6] * 8)
    counts = torch.bincount(labels, minlength=7).float()
    old = counts.sum() / (7 * counts.clamp(min=1))
    old = old / old[labels].mean()
    w = engine.class_balance(labels)
    present = counts > 0
    assert torch.allclose(w[present], old[present], rtol=1e-6) and w.dtype == torch.float32
