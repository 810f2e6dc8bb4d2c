"""Sampled teacher targets (kdexp.losses.sampled): the draws, the estimators against the dense
divergences (values and gradients, statistically: unbiased where top-k is not), the plain and
fused paths, and the sampled cache (kdexp.teacher_cache) built from a hand-built teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdexp import losses
from kdexp.errors import UserError
from kdexp.losses.fused import Head, Sparse
from kdexp.losses.objective import IGNORE_INDEX, Objective
from kdexp.losses.sampled import Sampled, draw, estimator, problems
from kdexp.teacher_cache import TeacherCache, build, bytes_per_token, open_cache, tail_logit
from tests.unit.test_teacher_cache import TableTeacher, Tok, V, cfg_for, examples, teacher_logprobs


def test_draw_counts_distinct_tokens():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(50, 7, generator=g) * 2, -1)
    ids, counts = draw(log_p, 12, torch.Generator().manual_seed(1))
    assert ids.shape == counts.shape == (50, 7)  # min(n, V) slots
    assert torch.all(counts.sum(-1) == 12)
    for row_ids, row_counts in zip(ids, counts, strict=True):
        used = row_ids[row_counts > 0]
        assert len(set(used.tolist())) == len(used)  # each token once, with its count
    assert torch.all(counts[:, :-1] >= counts[:, 1:])  # most drawn first
    one_hot = torch.full((3, 7), float("-inf")).index_fill(1, torch.tensor([4]), 0.0)
    ids, counts = draw(one_hot, 5)
    assert torch.all(ids[:, 0] == 4) and torch.all(counts[:, 0] == 5) and torch.all(counts[:, 1:] == 0)


def _targets(teacher_logits: torch.Tensor, n: int, reps: int, temperature: float, seed: int = 0) -> Sampled:
    """``reps`` independent targets of n draws for each row of ``teacher_logits`` [P, V]: [reps, P, S]."""
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    rows = log_p.repeat(reps, 1)
    ids, counts = draw(rows, n, torch.Generator().manual_seed(seed))
    shape = (reps, *teacher_logits.shape[:-1], ids.shape[-1])
    return Sampled(ids.reshape(shape), (counts.float() / n).reshape(shape), rows.gather(1, ids).reshape(shape))


def _value_and_grad(fn, student: torch.Tensor, reps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-repetition sums of ``fn`` over the positions and their gradients in ``student``, with
    one copy of the student per repetition: [R], [R, P, V]."""
    s = student.detach().double()[None].repeat(reps, 1, 1).requires_grad_(True)
    values = fn(s)  # [R, P]
    values.sum().backward()
    return values.sum(-1).detach(), s.grad


@pytest.mark.parametrize(("name", "params"), [("fkl", {"temperature": 2.0}), ("skl", {"temperature": 2.0, "alpha": 0.3}),
                                            ("tvd", {"temperature": 1.5})])
def test_the_sampled_estimate_is_unbiased_and_top_k_is_not(name, params):
    """Over many independent draws the mean estimate of the loss and of its gradient matches the
    dense divergence within a few standard errors; the top-4 cache's residual-mass target
    misses both by many."""
    g = torch.Generator().manual_seed(3)
    P, n, reps = 6, 4, 3000
    teacher = torch.randn(P, 40, generator=g) * 2.5
    student = torch.randn(P, 40, generator=g)
    T = params["temperature"]
    dense_value, dense_grad = _value_and_grad(lambda s: losses.divergence(name, **params)(s, teacher.double()), student)
    target = _targets(teacher.double(), n, reps, T)
    values, grads = _value_and_grad(lambda s: estimator(name, params)(s, target), student, reps)
    se = values.std() / reps ** 0.5
    assert abs(values.mean() - dense_value[0]) < 4 * se, (float(values.mean()), float(dense_value[0]), float(se))
    g_mean, g_se = grads.mean(0), grads.std(0) / reps ** 0.5
    z = (g_mean - dense_grad[0]).abs() / g_se.clamp_min(1e-12)
    assert float(z.max()) < 5.0  # 240 entries: none beyond 5 standard errors
    assert float(((g_mean - dense_grad[0]) ** 2).sum()) < 0.05 * float((dense_grad[0] ** 2).sum())
    # Top-4 with the rest spread evenly, as the top-k cache rebuilds it (exact, no noise):
    log_p = torch.log_softmax(teacher / T, -1)
    top = log_p.topk(4, -1)
    rest = log_p.scatter(1, top.indices, float("-inf")).logsumexp(-1)
    sparse = Sparse(top.indices, top.values * T, tail_logit(rest, 40, 4) * T, 40, torch.ones(1, P, dtype=torch.bool))
    top_value, top_grad = _value_and_grad(lambda s: losses.divergence(name, **params)(s, sparse.logits()[0].double()),
                                          student)
    assert abs(top_value[0] - dense_value[0]) > 20 * se
    assert float(((top_grad[0] - dense_grad[0]) / g_se.clamp_min(1e-12)).abs().max()) > 20


def test_with_every_draw_on_one_token_the_estimate_is_exact():
    """A teacher certain of one token: every draw is that token, and the estimate is the
    divergence itself (no noise), whatever n."""
    teacher = torch.full((2, 9), -1e4)
    teacher[:, 3] = 0.0
    student = torch.randn(2, 9)
    target = _targets(teacher, 5, 1, 1.0)[0]
    for name in ("fkl", "skl", "tvd"):
        torch.testing.assert_close(estimator(name, {})(student, target), losses.divergence(name)(student, teacher),
                                   atol=1e-5, rtol=1e-5)
    # a teacher with -inf logits: the unused slots may hold those tokens (log p = -inf, weight 0)
    teacher = torch.full((2, 9), float("-inf"))
    teacher[:, :2] = torch.tensor([0.0, -1.0])
    target = _targets(teacher, 6, 1, 1.0)[0]
    assert torch.isinf(target.log_p).any()
    for name in ("fkl", "skl", "tvd"):
        value = estimator(name, {})(student.requires_grad_(True), target).sum()
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        student = student.detach()


def test_only_the_estimable_divergences_are_served():
    assert estimator("rkl", {}) is None and estimator("jsd", {"beta": 0.5}) is None
    assert problems(["fkl", "skl", "tvd"]) == []
    (line,) = problems(["fkl", "rkl", "jsd", "rkl"])
    assert "loss=rkl, jsd" in line and "teacher.sparse=topk" in line


def test_the_fused_path_gives_the_plain_paths_loss_and_gradients():
    g = torch.Generator().manual_seed(5)
    B, T, H, Vs = 2, 5, 8, 30
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(Vs, H, generator=g) * 0.5
    targets = torch.randint(0, Vs, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX
    targets[1, 4] = IGNORE_INDEX
    mask = targets != IGNORE_INDEX
    log_p = torch.log_softmax(torch.randn(int(mask.sum()), Vs, generator=g), -1)
    ids, counts = draw(log_p, 6, torch.Generator().manual_seed(0))
    rows = Sampled(ids, counts.float() / 6, log_p.gather(1, ids), mask)
    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5},
                                     {"loss": "skl", "weight": 0.5, "temperature": 2.0, "alpha": 0.2}])
    n = int(mask.sum())

    def run(fused: bool):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        batch = {"targets": targets}
        if fused:
            loss, parts = objective.fused(Head(h, w), rows, batch, n, 1.0)
        else:
            loss, parts = objective(h @ w.T, rows.positions(), batch, n)
        loss.backward()
        return loss.detach(), parts, h.grad, w.grad

    plain, fused = run(False), run(True)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fused[2:], plain[2:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(fused[1]) == set(plain[1])


def sampled_cfg(tmp_path, n: int, seed: int = 0):
    cfg = cfg_for(tmp_path, 64)
    cfg.teacher.update({"sparse": "sampled", "samples": n, "sample_seed": seed, "cache": str(tmp_path / f"draws{n}")})
    return cfg


def test_a_sampled_cache_stores_the_draws_compactly_and_reproducibly(tmp_path):
    train = examples(9)
    cfg = sampled_cfg(tmp_path, 5)
    meta = build(cfg, TableTeacher(), Tok(), train, tmp_path / "draws5", 2, torch.device("cpu"), 2.0)
    assert meta["sparse"] == "sampled" and meta["samples"] == 5 and meta["slots"] == 5
    assert meta["bytes_per_token"] == bytes_per_token(5, V, "sampled") == 5 * (2 + 1 + 2)
    assert bytes_per_token(12, 32000, "sampled") == 60 and bytes_per_token(12, 152064, "sampled") == 84
    positions = sum(len(e.response_ids) for e in train)
    payload = sum(np.load(tmp_path / "draws5" / f"{a}.npy", mmap_mode="r").nbytes for a in ("ids", "counts", "logprobs"))
    assert payload == positions * meta["bytes_per_token"]
    cache = open_cache(cfg, train, Tok(), 2.0)
    assert cache.kind == "sampled" and isinstance(cache.counts, np.memmap)
    logp, batch = teacher_logprobs(train)
    target = cache.sampled(cache.row_indices(train), batch["targets"])
    mask = batch["targets"] != IGNORE_INDEX
    assert torch.all(target.weights.sum(-1) == 1.0)
    true = torch.log_softmax(TableTeacher().table[batch["input_ids"]].detach() / 2.0, -1)[mask]
    torch.testing.assert_close(target.log_p, true.gather(1, target.ids), atol=2e-3, rtol=1e-3)  # float16, at T
    # Another batch size draws the same tokens (seeded per sequence); another seed other ones.
    build(cfg, TableTeacher(), Tok(), train, tmp_path / "again", 4, torch.device("cpu"), 2.0)
    again = TeacherCache(tmp_path / "again").sampled(cache.row_indices(train), batch["targets"])
    assert torch.equal(again.ids, target.ids) and torch.equal(again.weights, target.weights)
    other = sampled_cfg(tmp_path, 5, seed=1)
    build(other, TableTeacher(), Tok(), train, tmp_path / "seed1", 2, torch.device("cpu"), 2.0)
    assert not torch.equal(TeacherCache(tmp_path / "seed1").sampled(cache.row_indices(train), batch["targets"]).ids,
                           target.ids)


def test_a_sampled_cache_is_refused_where_it_does_not_match(tmp_path):
    train = examples(4)
    cfg = sampled_cfg(tmp_path, 5)
    build(cfg, TableTeacher(), Tok(), train, tmp_path / "draws5", 2, torch.device("cpu"), 1.0)
    cfg.teacher.samples = 6
    with pytest.raises(UserError, match="holds 5 draws, but the run asks for 6 draws; set teacher.sparse=sampled "
                                        "teacher.samples=5"):
        open_cache(cfg, train, Tok(), 1.0)
    cfg.teacher.samples, cfg.teacher.sparse = 5, "topk"
    with pytest.raises(UserError, match="holds 5 draws, but the run asks for top-64"):
        open_cache(cfg, train, Tok(), 1.0)
    cfg.teacher.sparse, cfg.teacher.samples = "sampled", 300
    with pytest.raises(UserError, match="teacher.samples must be an integer from 1 to 255"):
        open_cache(cfg, train, Tok(), 1.0)
    meta = json.loads((tmp_path / "draws5" / "meta.json").read_text())
    assert "top_k" not in meta  # a sampled cache is not mistaken for a top-k one


def test_a_sampled_caches_draws_follow_the_teacher_at_the_loss_temperature(tmp_path):
    """255 draws per position at T = 2: each token's share of the draws is within 5 standard
    errors of its probability under the tempered teacher (the library's own draws, not the
    test's; draws at T = 1 would miss by far more)."""
    train = examples(12, seed=4)
    cfg = sampled_cfg(tmp_path, 255)
    build(cfg, TableTeacher(), Tok(), train, tmp_path / "draws255", 5, torch.device("cpu"), 2.0)
    cache = TeacherCache(tmp_path / "draws255")
    _, batch = teacher_logprobs(train)
    target = cache.sampled(cache.row_indices(train), batch["targets"])
    mask = batch["targets"] != IGNORE_INDEX
    p_t = torch.softmax(TableTeacher().table[batch["input_ids"]].detach() / 2.0, -1)[mask]  # [N, V]
    share = torch.zeros_like(p_t).scatter_add_(1, target.ids, target.weights)
    se = (p_t * (1 - p_t) / 255).sqrt().clamp_min(1e-3)
    assert float(((share - p_t).abs() / se).max()) < 5
    p_1 = torch.softmax(TableTeacher().table[batch["input_ids"]].detach(), -1)[mask]
    assert float(((share - p_1).abs() / se).max()) > 10
