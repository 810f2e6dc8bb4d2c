"""The fused path (kdexp.losses.fused, Objective.fused) against the plain path: the same values
and the same gradients for the student's hidden states, head weight and bias, and the teacher's
when it trains (OKD), for CE and every divergence, on odd shapes with masked positions."""

from __future__ import annotations

import pytest
import torch

from kdexp import losses
from kdexp.losses import fused
from kdexp.losses.objective import IGNORE_INDEX, Objective

pytestmark = pytest.mark.unit

B, T, V, H = 3, 47, 123, 37
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "akl": {"mu": 0.6},
          "ab": {"alpha": 0.4, "beta": 0.5}, "alpha": {"alpha": 0.3}, "taid": {"t": 0.4},
          "amid": {"alpha": -0.5, "lam": 0.3}}


def _inputs(seed: int = 0, bias: bool = True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype).requires_grad_()  # noqa: E731
    student = {"hidden": leaf(B, T, H), "weight": leaf(V, H, s=0.3), "bias": leaf(V, s=0.5) if bias else None}
    teacher = {"hidden": leaf(B, T, H), "weight": leaf(V, H, s=0.4), "bias": leaf(V, s=0.5) if bias else None}
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :10] = IGNORE_INDEX          # a prompt
    targets[1, 30:] = IGNORE_INDEX          # padding
    targets[2, ::3] = IGNORE_INDEX          # scattered
    batch = {"targets": targets, "origin": torch.tensor([0, 2, 2])}
    return student, teacher, batch


def _count(batch) -> float:
    return float((batch["targets"] != IGNORE_INDEX).sum())


def _grads(loss, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, wanted, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, got, strict=True)]


def _both(objective: Objective, student, teacher, batch, counts, chunk_size=None, autocast=False):
    """(plain loss, plain parts, plain grads), (fused ...): the same leaves differentiated twice."""
    leaves = [*student.values(), *teacher.values()]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        s_head, t_head = fused.Head(**student), fused.Head(**teacher)
        plain, plain_parts = objective(s_head.logits(), t_head.logits(), batch, counts)
    plain_grads = _grads(plain, leaves)
    for term in objective.terms:
        object.__setattr__(term, "chunk_size", chunk_size or 17)
    with ctx:
        got, got_parts = objective.fused(fused.Head(**student), fused.Head(**teacher), batch, counts)
    got_grads = _grads(got, leaves)
    return (plain, plain_parts, plain_grads), (got, got_parts, got_grads)


def _close(a, b, tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["ce", *losses.names()])
def test_every_divergence_and_ce_match_the_plain_path(name):
    student, teacher, batch = _inputs()
    spec = [{"loss": "ce", "weight": 0.3}] if name == "ce" else [
        {"loss": "ce", "weight": 0.3}, {"loss": name, "weight": 0.7, "temperature": 2.0, **PARAMS.get(name, {})}]
    objective = Objective.from_spec(spec)
    (p, pp, pg), (f, fp, fg) = _both(objective, student, teacher, batch, _count(batch))
    torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)
    assert pp.keys() == fp.keys()
    _close([fp[k] for k in pp], [pp[k] for k in pp], 1e-5)
    # the teacher gets no gradient (its logits are detached for the student's terms)
    assert len(pg) == 6 and all(g.abs().sum() == 0 for g in pg[3:])
    _close(fg, pg, 2e-5)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_bfloat16_autocast_matches_the_plain_path(name):
    student, teacher, batch = _inputs(1)
    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": name, "weight": 0.5,
                                                                       "temperature": 1.5}])
    (p, _, pg), (f, _, fg) = _both(objective, student, teacher, batch, _count(batch), autocast=True)
    torch.testing.assert_close(f, p, rtol=1e-3, atol=1e-4)
    for a, b in zip(fg, pg, strict=True):  # bf16 logits: each chunk rounds like the plain path
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)


def test_bfloat16_parameters_and_no_bias():
    student, teacher, batch = _inputs(2, bias=False, dtype=torch.bfloat16)
    objective = Objective.from_spec([{"loss": "ce", "weight": 1.0}, {"loss": "fkl", "weight": 1.0}])
    (p, _, pg), (f, _, fg) = _both(objective, student, teacher, batch, _count(batch))
    torch.testing.assert_close(f, p, rtol=1e-3, atol=1e-3)
    assert all(g.dtype == torch.bfloat16 for g in fg)
    for a, b in zip(fg, pg, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-3)


def test_the_teacher_trains_through_its_own_terms_only():
    """OKD: the teacher's CE and a divergence with the student detached reach the teacher's
    hidden states and head; the student's terms do not."""
    student, teacher, batch = _inputs(3)
    objective = Objective.from_spec([
        {"loss": "ce", "weight": 1.0}, {"loss": "fkl", "weight": 1.0, "temperature": 2.0},
        {"loss": "ce", "weight": 0.5, "trains": "teacher"},
        {"loss": "rkl", "weight": 0.5, "trains": "teacher", "temperature": 2.0}])
    (p, pp, pg), (f, fp, fg) = _both(objective, student, teacher, batch, _count(batch))
    torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in pg[3:])
    _close(fg, pg, 2e-5)


def test_row_restrictions_sample_weights_and_per_term_counts():
    student, teacher, batch = _inputs(4)
    objective = Objective.from_spec([{"loss": "ce", "weight": 1.0, "rows": ["data"]},
                                     {"loss": "srkl", "weight": 1.0, "rows": ["student"], "alpha": 0.1}],
                                    sample_weight="teacher_likelihood", min_weight=0.05)
    counts = objective.token_counts(batch)
    (p, pp, pg), (f, fp, fg) = _both(objective, student, teacher, batch, {k: float(v) for k, v in counts.items()})
    torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)
    assert pp.keys() == fp.keys() and "sample_weight_sum" in fp
    _close([fp[k] for k in pp], [pp[k] for k in pp], 1e-5)
    _close(fg, pg, 2e-5)


def test_vocabulary_cut_and_a_sparse_cached_teacher():
    """A head cut to the compared width, and a teacher given as top-k ids, values and a fill."""
    student, teacher, batch = _inputs(5)
    mask = batch["targets"] != IGNORE_INDEX
    n, k, width = int(mask.sum()), 7, V - 3
    batch["targets"] = torch.where(mask, batch["targets"] % width, IGNORE_INDEX)
    g = torch.Generator().manual_seed(9)
    ids = torch.stack([torch.randperm(width, generator=g)[:k] for _ in range(n)])
    sparse = fused.Sparse(ids, torch.randn(n, k, generator=g), torch.full((n,), -9.0), width, mask)
    s_head = fused.Head(**student, vocab=width)
    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": "fkl", "weight": 0.5}])
    plain, _ = objective(s_head.logits(), sparse.logits(), batch, _count(batch))
    got, _ = objective.fused(s_head, sparse, batch, _count(batch))
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    _close(_grads(got, student.values()), _grads(plain, student.values()), 2e-5)


def test_a_dense_teacher_and_a_batch_without_targets():
    student, teacher, batch = _inputs(6)
    objective = Objective.from_spec([{"loss": "rkl", "weight": 1.0}])
    t_logits = fused.Head(**teacher).logits().detach()
    plain, _ = objective(fused.Head(**student).logits(), t_logits, batch, _count(batch))
    got, _ = objective.fused(fused.Head(**student), fused.Dense(t_logits), batch, _count(batch))
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    empty = {**batch, "targets": torch.full((B, T), IGNORE_INDEX)}
    got, parts = objective.fused(fused.Head(**student), fused.Dense(t_logits), empty, 1.0)
    assert float(got) == 0 and float(parts["rkl"]) == 0
    grads = _grads(got, student.values())
    assert all(float(g.abs().sum()) == 0 for g in grads)


def test_chunks_bound_the_working_set():
    """No tensor of N x V elements is built: every chunk's logits are at most chunk x V."""
    student, teacher, batch = _inputs(7)
    seen = []
    original = fused._linear

    def spy(vocab):
        build = original(vocab)

        def wrapped(h, w, b):
            seen.append(h.shape[0])
            return build(h, w, b)
        return wrapped

    fused._linear = spy
    try:
        objective = Objective.from_spec([{"loss": "fkl", "weight": 1.0, "chunk_size": 16}])
        objective.fused(fused.Head(**student), fused.Head(**teacher), batch, _count(batch))
    finally:
        fused._linear = original
    assert seen and max(seen) <= 16 and sum(seen) == 2 * _count(batch)


def test_only_per_position_terms_are_fusable():
    assert Objective.from_spec([{"loss": "ce"}, {"loss": "fkl"}]).fusable
    assert Objective.from_spec([{"loss": "fkl", "fused": "false"}]).fused_mode == "false"
    assert Objective.from_spec([{"loss": "fkl", "fused": True}]).fused_mode == "true"
    from kdexp.errors import UserError
    with pytest.raises(UserError, match="loss.fused must be auto, true or false"):
        Objective.from_spec([{"loss": "fkl", "fused": "sometimes"}])


def test_a_loss_scale_reaches_low_precision_inputs_without_overflow():
    """fp16's GradScaler multiplies the loss by 65536, which is inf in float16: the chunks'
    gradients are computed at that scale (no underflow), and scaled in float32 and cast after,
    as the plain path's are."""
    student, teacher, batch = _inputs(8, dtype=torch.float16)
    objective = Objective.from_spec([{"loss": "ce", "weight": 1.0}, {"loss": "fkl", "weight": 1.0}])
    scale = torch.tensor(65536.0)
    plain, _ = objective(fused.Head(**student).logits(), fused.Head(**teacher).logits(), batch, _count(batch))
    got, _ = objective.fused(fused.Head(**student), fused.Head(**teacher), batch, _count(batch), float(scale))
    leaves = list(student.values())
    want = torch.autograd.grad(plain * scale, leaves)
    have = torch.autograd.grad(got * scale, leaves)
    for a, b in zip(have, want, strict=True):
        assert a.dtype == torch.float16 and torch.isfinite(a).all()
        assert float((a == 0).float().mean()) <= float((b == 0).float().mean()) + 0.01  # nothing underflows
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2.0)


def test_float64_stays_float64_and_the_loss_can_be_differentiated_twice():
    student, teacher, batch = _inputs(9, dtype=torch.float64)
    objective = Objective.from_spec([{"loss": "jsd", "weight": 1.0, "beta": 0.4}])
    plain, _ = objective(fused.Head(**student).logits(), fused.Head(**teacher).logits(), batch, _count(batch))
    got, _ = objective.fused(fused.Head(**student), fused.Head(**teacher), batch, _count(batch))
    want = _grads(plain, student.values())
    first = torch.autograd.grad(got, list(student.values()), retain_graph=True)
    again = torch.autograd.grad(2 * got, list(student.values()))
    for a, b, c in zip(first, again, want, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, 2 * c, rtol=1e-10, atol=1e-12)


def test_without_grad_mode_only_the_value_is_computed():
    student, teacher, batch = _inputs(10)
    objective = Objective.from_spec([{"loss": "rkl", "weight": 1.0}])
    with torch.no_grad():
        got, _ = objective.fused(fused.Head(**student), fused.Head(**teacher), batch, _count(batch))
    plain, _ = objective(fused.Head(**student).logits(), fused.Head(**teacher).logits(), batch, _count(batch))
    assert not got.requires_grad
    torch.testing.assert_close(got, plain.detach(), rtol=1e-5, atol=1e-6)


def test_the_chunk_size_is_the_divergence_terms_next_to_a_bare_ce():
    """kd_weight's objective is [ce, divergence]: loss.chunk_size sits on the divergence."""
    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": "fkl", "weight": 0.5, "chunk_size": 4}])
    assert objective.fused_chunk == 4
    assert Objective.from_spec([{"loss": "ce"}, {"loss": "fkl", "chunk_size": None}]).fused_chunk == "auto"
    assert Objective.from_spec([{"loss": "ce"}, {"loss": "fkl"}]).fused_chunk == "auto"


def test_a_head_hook_set_on_the_instance_survives_and_logit_transforms_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdexp.teachers.base import bare_heads, linear_head

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    head, why = linear_head(model)
    assert head is model.lm_head and why == ""
    hooked = lambda x: torch.nn.functional.linear(x, head.weight) * 2  # noqa: E731  (an accelerate-style hook)
    head.forward = hooked
    with bare_heads(head, head):  # twice: the same head once
        x = torch.randn(3, 16)
        assert torch.equal(head(x), x)
    assert head.forward is hooked
    del head.forward
    model.config.final_logit_softcapping = 30.0  # Gemma-2's: the logits are not the head's output
    head, why = linear_head(model)
    assert head is None and "final_logit_softcapping" in why


def test_a_head_under_the_engines_bf16_autocast_is_still_linear():
    """accelerate runs the forward under bf16 autocast and hands the logits back in float32:
    the head is still recognised (found on an H200, where every run fell back to the plain path)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdexp.teachers.base import linear_head

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's state would refuse bf16
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        head, why = linear_head(model)
    finally:  # accelerate's state is process-wide: later tests get their own
        AcceleratorState._reset_state(reset_partial_state=True)
    assert head is model.lm_head, why


def test_a_frozen_teachers_head_is_cast_once_under_autocast_with_the_same_loss():
    student, teacher, batch = _inputs(2)
    teacher = {k: v.detach() for k, v in teacher.items()}  # frozen: autocast would not cache its cast
    objective = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": "fkl", "weight": 0.5}])
    (p, _, pg), (f, _, fg) = _both(objective, student, teacher, batch, _count(batch), autocast=True)
    torch.testing.assert_close(f, p, rtol=1e-3, atol=1e-4)
    for a, b in zip(fg, pg, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused._once(teacher["weight"]).dtype == torch.bfloat16
        assert fused._once(student["weight"]) is student["weight"]  # a leaf with a gradient: autocast caches it
    assert fused._once(teacher["weight"]) is teacher["weight"]  # no autocast: untouched
