"""The learning-rate schedule (grpo_cli/trainer/optim.py: lr_factor, build_optimizer's LambdaLR) against
hand-computed multipliers: linear warmup, then constant, linear decay to 0 or cosine decay to 10%."""

import math

import pytest
import torch

from grpo_cli.config.schema import TrainerConfig
from grpo_cli.errors import UserError
from grpo_cli.trainer.optim import build_optimizer, lr_factor, param_groups


def factors(schedule: str, warmup: int, total: int, steps: int):
    return [lr_factor(s, warmup=warmup, total=total, schedule=schedule) for s in range(steps)]


def test_warmup_is_linear_from_one_warmup_th_to_the_peak_whatever_the_schedule():
    # warmup = 4: step s (0-based) has (s + 1) / 4 = 0.25, 0.5, 0.75, 1.0
    for schedule in ("constant", "linear", "cosine"):
        assert factors(schedule, 4, 100, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_constant_schedule():
    # warmup = 2: 0.5, 1.0; then 1.0 for ever, also past total
    assert factors("constant", 2, 6, 9) == pytest.approx([0.5, 1.0, 1, 1, 1, 1, 1, 1, 1])
    assert factors("constant", 0, 3, 3) == [1.0, 1.0, 1.0]


def test_linear_schedule_decays_to_zero_at_total():
    # warmup = 2, total = 10: progress = (s - 2) / (10 - 2) = (s - 2) / 8 after warmup, factor 1 - progress
    #   s = 2: 1 - 0/8 = 1;  s = 4: 1 - 2/8 = 0.75;  s = 6: 1 - 4/8 = 0.5;  s = 9: 1 - 7/8 = 0.125
    #   s = 10: 0;  s = 12: progress min(1, 10/8) = 1 -> 0 (never negative)
    got = factors("linear", 2, 10, 13)
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert [got[s] for s in (2, 4, 6, 9, 10, 12)] == pytest.approx([1.0, 0.75, 0.5, 0.125, 0.0, 0.0])
    # no warmup, total = 4: 1 - s/4 = 1, 0.75, 0.5, 0.25
    assert factors("linear", 0, 4, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_cosine_schedule_decays_to_a_tenth():
    # no warmup, total = 4: 0.1 + 0.9 * 0.5 * (1 + cos(pi * s / 4))
    #   s = 0: 0.1 + 0.45 * 2 = 1.0
    #   s = 1: 0.1 + 0.45 * (1 + 0.70711) = 0.86820
    #   s = 2: 0.1 + 0.45 * (1 + 0) = 0.55
    #   s = 3: 0.1 + 0.45 * (1 - 0.70711) = 0.23180
    #   s = 4 and later (progress clamped to 1): 0.1 + 0.45 * 0 = 0.1
    assert factors("cosine", 0, 4, 6) == pytest.approx([1.0, 0.86820, 0.55, 0.23180, 0.1, 0.1], abs=1e-5)
    # warmup = 1, total = 5: s = 0 warms up (1/1 = 1.0); s = 3 has progress (3 - 1) / 4 = 0.5 -> 0.55
    assert lr_factor(3, warmup=1, total=5, schedule="cosine") == pytest.approx(0.55)
    assert lr_factor(0, warmup=1, total=5, schedule="cosine") == 1.0


def test_total_not_past_warmup_divides_by_one_not_zero():
    # total = warmup = 2: progress = (s - 2) / max(1, 0) = s - 2, clamped to 1
    assert lr_factor(2, warmup=2, total=2, schedule="linear") == 1.0
    assert lr_factor(3, warmup=2, total=2, schedule="linear") == 0.0
    assert math.isfinite(lr_factor(5, warmup=0, total=0, schedule="cosine"))


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="trainer.schedule: expected constant, linear or cosine, got 'cosin'"):
        lr_factor(0, warmup=0, total=10, schedule="cosin")
    with pytest.raises(UserError, match="trainer.schedule"):
        build_optimizer(torch.nn.Linear(2, 2), TrainerConfig(schedule="cosin", warmup_steps=0, optimizer="sgd"), 1)


def test_unknown_schedule_is_refused_before_training_also_with_warmup():
    # build_optimizer checks the name with lr_factor(0, ...), a warmup step: the name is checked first
    try:
        build_optimizer(torch.nn.Linear(2, 2), TrainerConfig(schedule="cosin", warmup_steps=10, optimizer="sgd"), 1)
    except UserError:
        return
    raise AssertionError("build_optimizer accepted trainer.schedule=cosin")


def test_the_scheduler_applies_the_factor_per_optimiser_step_over_steps_times_updates():
    # steps = 3 batches x 2 updates per batch (GRPO's mu) = 6 optimiser steps; warmup 2, linear:
    #   optimiser step 0: 1/2, 1: 2/2, then 1 - (s - 2) / (6 - 2): s = 2: 1, 3: 0.75, 4: 0.5, 5: 0.25
    cfg = TrainerConfig(lr=0.1, warmup_steps=2, schedule="linear", steps=3, optimizer="sgd")
    model = torch.nn.Linear(2, 1)
    opt, sched = build_optimizer(model, cfg, 2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])


def test_param_groups_scale_each_modules_lr_and_give_a_shared_parameter_to_the_last_module():
    shared = torch.nn.Linear(2, 2)
    policy, value = torch.nn.Sequential(shared), torch.nn.Sequential(shared, torch.nn.Linear(2, 1))
    value.lr_scale = 3.0
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    groups = param_groups(torch.nn.ModuleList([policy, value, frozen]), 0.01)
    # policy's only parameters are shared with value, which comes later and claims them: one group,
    # value's, at 0.01 * 3; the frozen module has no trainable parameter, so no group
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.03)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in value.parameters()}
    own = torch.nn.Linear(2, 2)
    groups = param_groups(torch.nn.ModuleList([torch.nn.Sequential(own), value]), 0.01)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.03])  # module order; lr_scale 1 when unset
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in own.parameters()}
