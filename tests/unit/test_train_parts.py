"""The loop's small parts: the resumable batch stream and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from kdexp.errors import UserError
from kdexp.train import BatchStream, lr_lambda


def take(stream, k):
    return [stream.next() for _ in range(k)]


def test_each_epoch_is_a_permutation_without_repeats():
    s = BatchStream(n=23, micro_batch_size=4, world=1, rank=0, seed=3)
    assert s.per_epoch == 5  # the incomplete last micro-batch is dropped
    epoch0 = take(s, 5)
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 20 and set(flat) <= set(range(23))
    epoch1 = take(s, 5)
    assert s.epoch == 1 and epoch0 != epoch1  # a fresh order every epoch


def test_the_stream_is_a_function_of_the_seed():
    a, b, c = (BatchStream(50, 5, 1, 0, seed) for seed in (1, 1, 2))
    assert take(a, 12) == take(b, 12) != take(c, 12)


def test_ranks_split_each_global_micro_batch():
    one = BatchStream(40, 4, world=1, rank=0, seed=0)
    r0, r1 = (BatchStream(40, 2, world=2, rank=r, seed=0) for r in (0, 1))
    for _ in range(10):
        both = r0.next() + r1.next()
        assert both == one.next()  # same examples per step whatever the process count


def test_state_dict_resumes_the_same_sequence():
    s = BatchStream(30, 4, 1, 0, seed=5)
    take(s, 9)  # into the second epoch
    state = s.state_dict()
    expected = take(s, 6)
    t = BatchStream(30, 4, 1, 0, seed=5)
    t.load_state_dict(state)
    assert take(t, 6) == expected


def test_too_small_a_split_is_a_user_error():
    with pytest.raises(UserError, match="micro_batch_size"):
        BatchStream(3, 4, 1, 0, seed=0)


def test_lr_schedule_warms_up_then_decays_linearly():
    f = lr_lambda(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(1 - 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    decay = [f(s) for s in range(4, 15)]
    assert all(x > y for x, y in zip(decay, decay[1:], strict=False))


def test_deepspeed_config_follows_the_train_section(compose):
    """Micro-batch, accumulation, global batch and clipping come from train.*; stage 3 saves a
    gathered state dict; deepspeed.config merges any DeepSpeed key on top, nested."""
    from kdexp.engine import deepspeed_config

    cfg = compose(["deepspeed=zero3", "train.batch_size=32", "train.micro_batch_size=4",
                   "train.max_grad_norm=0.5", "deepspeed.offload_optimizer=cpu",
                   "+deepspeed.config={zero_optimization: {overlap_comm: true}, steps_per_print: 5}"])
    ds = deepspeed_config(cfg, accum=4, world=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 4, 32)
    assert ds["gradient_clipping"] == 0.5 and ds["steps_per_print"] == 5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["overlap_comm"] is True
    assert "offload_param" not in zero
    assert "stage3_gather_16bit_weights_on_model_save" not in deepspeed_config(
        compose(["deepspeed=zero2"]), accum=1, world=1)["zero_optimization"]


def test_deepspeed_missing_is_a_clear_error(compose, monkeypatch):
    import sys

    from kdexp.engine import make_accelerator
    from kdexp.errors import UserError

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(UserError, match=r"deepspeed=zero2 needs DeepSpeed: pip install 'kdexp\[deepspeed\]'"):
        make_accelerator(compose(["deepspeed=zero2"]), accum=1, world=1)


def test_schedule_epochs_and_warmup_ratio_replace_steps():
    from omegaconf import OmegaConf

    from kdexp.train import schedule

    base = {"max_steps": 1000, "epochs": None, "batch_size": 32, "warmup_steps": 50, "warmup_ratio": None}
    assert schedule(OmegaConf.create(base), 14000) == (1000, 50)
    # 20 epochs of 14000 examples in batches of 32: 437.5 steps per epoch -> 8750
    assert schedule(OmegaConf.create({**base, "epochs": 20}), 14000) == (8750, 50)
    assert schedule(OmegaConf.create({**base, "epochs": 1}), 14001) == (438, 50)  # rounded up
    assert schedule(OmegaConf.create({**base, "epochs": 20, "warmup_ratio": 0.03}), 14000) == (8750, 262)
    assert schedule(OmegaConf.create({**base, "warmup_ratio": 0.03}), 14000) == (1000, 30)
    assert schedule(OmegaConf.create({**base, "epochs": 0.001}), 100) == (1, 50)  # at least one step


def test_lr_schedules_cosine_and_constant():
    import math

    cos = lr_lambda(warmup=0, total=100, min_ratio=0.0, kind="cosine")
    assert cos(0) == 1.0 and abs(cos(50) - 0.5) < 1e-12 and abs(cos(100)) < 1e-12
    assert abs(cos(25) - (1 + math.cos(math.pi / 4)) / 2) < 1e-12
    floor = lr_lambda(warmup=10, total=110, min_ratio=0.2, kind="cosine")
    assert floor(4) == 0.5 and floor(10) == 1.0 and abs(floor(110) - 0.2) < 1e-12
    assert floor(500) == floor(110)  # past the end: stays at the floor
    const = lr_lambda(warmup=100, total=5000, min_ratio=0.0, kind="constant")
    assert const(49) == 0.5 and const(100) == const(4999) == 1.0


def _accelerator(scaler=None, zero: int = 0, optimizer=None):
    """What kdexp.engine reads of an Accelerator, with accelerate's fp16 behaviour: the loss
    scaler, the ZeRO stage, and ``unscale_gradients`` unscaling every optimizer."""
    from types import SimpleNamespace

    plugin = SimpleNamespace(zero_stage=zero) if zero else None
    return SimpleNamespace(scaler=scaler, state=SimpleNamespace(deepspeed_plugin=plugin),
                           unscale_gradients=lambda: scaler.unscale_(optimizer) if scaler else None)


def test_the_fused_path_seeds_its_gradients_at_the_engines_loss_scale():
    """torch AMP's GradScaler scale; DeepSpeed's own fp16 loss scale (no GradScaler there: the
    fused chunks' float16 gradients underflowed at scale 1); 1 under bf16 or float32."""
    from types import SimpleNamespace

    from kdexp.engine import loss_scale

    assert loss_scale(_accelerator(torch.amp.GradScaler("cpu", init_scale=1024.0)), None) == 1024.0
    ds_fp16 = SimpleNamespace(fp16_enabled=lambda: True, optimizer=SimpleNamespace(loss_scale=4096.0))
    assert loss_scale(_accelerator(zero=2), ds_fp16) == 4096.0
    assert loss_scale(_accelerator(zero=3), SimpleNamespace(fp16_enabled=lambda: False)) == 1.0  # bf16
    assert loss_scale(_accelerator(), torch.nn.Linear(2, 2)) == 1.0


def test_fp16_clipping_unscales_once_for_every_group_and_a_skipped_step_closes_the_scaler():
    """Two parameter groups (OKD's student and teacher module) under a GradScaler: one unscale,
    true norms; a step dropped by the guard calls ``update`` (else the next unscale raises)."""
    from kdexp.engine import clip, skipped

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    accelerator = _accelerator(scaler, optimizer=optimizer)
    for _ in range(2):  # two steps, both dropped
        scaler.scale(torch.ones(()))  # the step's backward scaled its loss
        a.grad, b.grad = torch.full((3,), 256.0 * 2), torch.full((4,), 256.0 * 3)  # scaled gradients
        norms = clip(accelerator, [[a], [b]], max_norm=100.0)
        torch.testing.assert_close(torch.stack(norms), torch.tensor([2 * 3**0.5, 3 * 4**0.5]))
        skipped(accelerator)
    a.grad = torch.ones(3)
    clip(accelerator, [[a], [b]], max_norm=0.0)
    with pytest.raises(RuntimeError, match="unscale_"):  # without closing the step: GradScaler refuses
        clip(accelerator, [[a], [b]], max_norm=0.0)
