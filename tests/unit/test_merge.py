"""Merge-of-Thought's hook (kdexp.teachers.merge) on a hand-driven model: the branches start from
the round's base, the round ends with their average, the optimizer restarts with each branch,
and a checkpoint in the middle of a round resumes to the same weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from kdexp.errors import UserError
from kdexp.step import lr_lambda
from kdexp.teachers.merge import MergeOfThought, branch_schedule, branch_step


class Accelerator:
    distributed_type = SimpleNamespace(value="NO")

    def unwrap_model(self, model):
        return model


class Stream:
    """The data stream: batch i's 'data' is i (what the train loop's BatchStream is to the hook)."""

    def __init__(self):
        self.index = 0

    def next(self) -> int:
        self.index += 1
        return self.index - 1

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def context(model, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return SimpleNamespace(accelerator=Accelerator(), student=model, optimizer=optimizer, max_steps=steps,
                           teacher=SimpleNamespace(active=None), stream=Stream())


def loss_of(model, target: float, batch: int) -> torch.Tensor:
    """Every weight pulled towards the branch's teacher ``target``, shifted by the batch's data."""
    return sum(((p - target - 0.1 * batch) ** 2).sum() for p in model.parameters())


def drive(hook, ctx, start: int, stop: int, targets: list[float], seen: list[int]) -> None:
    for step in range(start, stop):
        seen.append((ctx.teacher.active, ctx.stream.index))
        loss_of(ctx.student, targets[ctx.teacher.active], ctx.stream.next()).backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad()
        hook.after_step(ctx, step + 1, {})


def test_two_rounds_of_three_branches_against_an_independent_reference():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = copy.deepcopy(model)
    targets, k, r = [1.0, -2.0, 0.5], 3, 2
    ctx = context(model, 2 * k * r)
    hook = MergeOfThought(k, r)
    hook.setup(ctx, resumed=False)
    seen: list[int] = []
    drive(hook, ctx, 0, 2 * k * r, targets, seen)
    # each teacher's branch in turn, R steps each, on the same batches within a round
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3)]

    base = [p.detach().clone() for p in reference.parameters()]
    for round_ in range(2):  # the reference: each branch a fresh copy and a fresh AdamW on the round's batches, then the mean
        ends = []
        for target in targets:
            branch = copy.deepcopy(reference)
            with torch.no_grad():
                for p, b in zip(branch.parameters(), base, strict=True):
                    p.copy_(b)
            opt = torch.optim.AdamW(branch.parameters(), lr=0.1)
            for i in range(r):
                loss_of(branch, target, round_ * r + i).backward()
                opt.step()
                opt.zero_grad()
            ends.append([p.detach().clone() for p in branch.parameters()])
        base = [torch.stack(ws).mean(0) for ws in zip(*ends, strict=True)]
    for got, want in zip(model.parameters(), base, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_between_branches_the_weights_are_the_base_and_the_optimizer_is_fresh():
    torch.manual_seed(1)
    model = torch.nn.Linear(2, 2)
    ctx = context(model, 4)
    hook = MergeOfThought(2, 2)
    hook.setup(ctx, resumed=False)
    start = [p.detach().clone() for p in model.parameters()]
    drive(hook, ctx, 0, 1, [1.0, -1.0], [])
    assert ctx.optimizer.state  # mid-branch: AdamW's moments carry on
    drive(hook, ctx, 1, 2, [1.0, -1.0], [])
    assert not ctx.optimizer.state and ctx.teacher.active == 1
    for p, s in zip(model.parameters(), start, strict=True):
        assert torch.equal(p.detach(), s)


def test_a_checkpoint_inside_a_round_resumes_to_the_same_weights():
    torch.manual_seed(2)
    targets = [1.0, -1.0]
    whole = torch.nn.Linear(3, 3)
    cut = copy.deepcopy(whole)
    ctx = context(whole, 8)
    hook = MergeOfThought(2, 2)
    hook.setup(ctx, resumed=False)
    drive(hook, ctx, 0, 8, targets, [])

    ctx2 = context(cut, 8)
    first = MergeOfThought(2, 2)
    first.setup(ctx2, resumed=False)
    drive(first, ctx2, 0, 3, targets, [])  # into the second branch of round 1
    saved = (copy.deepcopy(first.state_dict()), copy.deepcopy(cut.state_dict()),
             copy.deepcopy(ctx2.optimizer.state_dict()), ctx2.stream.state_dict())  # as a checkpoint holds them
    resumed_model = torch.nn.Linear(3, 3)
    resumed_model.load_state_dict(saved[1])
    ctx3 = context(resumed_model, 8)
    ctx3.optimizer.load_state_dict(saved[2])
    ctx3.stream.load_state_dict(saved[3])
    again = MergeOfThought(2, 2)
    again.load_state_dict(saved[0])  # a checkpoint is read before setup
    again.setup(ctx3, resumed=True)
    assert ctx3.teacher.active == 1
    drive(again, ctx3, 3, 8, targets, [])
    for a, b in zip(whole.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_count_that_ends_inside_a_round_is_refused():
    ctx = context(torch.nn.Linear(2, 2), 10)
    with pytest.raises(UserError, match=r"multiple of 8, e.g. train.max_steps=8"):
        MergeOfThought(2, 4).setup(ctx, resumed=False)


def test_the_branches_of_a_round_take_the_same_learning_rates():
    k, r, rounds, warmup = 3, 4, 2, 6
    total = rounds * k * r
    w, t = branch_schedule(k, warmup, total)
    assert (w, t) == (2, rounds * r)
    factor = lr_lambda(w, t, 0.1)
    lrs = [factor(branch_step(s, k, r)) for s in range(total)]
    for round_ in range(rounds):
        first = lrs[round_ * k * r: round_ * k * r + r]
        for b in range(1, k):
            assert lrs[round_ * k * r + b * r: round_ * k * r + (b + 1) * r] == first
    # one branch per round walks one whole schedule: warmup, then the decay to its end
    assert [branch_step(s, k, r) for s in range(total) if (s // r) % k == 0] == list(range(t))
    assert lrs[0] == factor(0) and lrs[-1] == factor(t - 1) and factor(t - 1) < factor(w)


def test_only_the_hook_declares_its_state_untouched_while_micro_batches_are_drawn():
    """A failing served teacher puts back the state of every component that drawing can change:
    on-policy sources keep counters that must not shadow that flag (a name clash once made it 0)."""
    from kdexp.methods.sources import OnPolicy, Source

    assert OnPolicy(lambda step, micro: 0.5, Source()).changes_when_drawn is True
    assert Source().changes_when_drawn is True and MergeOfThought(2, 1).changes_when_drawn is False
