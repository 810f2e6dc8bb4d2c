"""Methods on generated outputs: their terms on hand-built tensors, their schedules, and their
sources on the bundled tiny models (a real Context, one process)."""

from __future__ import annotations

import math

import pytest
import torch

from kdexp import losses
from kdexp.data import collate_train
from kdexp.data.encode import Example
from kdexp.losses.objective import IGNORE_INDEX, Objective
from kdexp.methods import Context, rl, sources

# --- terms --------------------------------------------------------------------------------


def test_normalized_returns_by_brute_force():
    torch.manual_seed(0)
    r = torch.randn(3, 7)
    mask = torch.ones(3, 7)
    mask[1, 5:] = 0
    mask[2, :] = 0
    mask[2, 2:4] = 1
    gamma = 0.9
    got = rl.normalized_returns(r, mask, gamma)
    for b in range(3):
        for t in range(7):
            if not mask[b, t]:
                assert got[b, t] == 0
                continue
            later = [k for k in range(t, 7) if mask[b, k]]
            ref = sum(gamma ** (k - t) * r[b, k].item() for k in range(t, 7) if mask[b, k])
            assert got[b, t].item() == pytest.approx(ref / len(later), rel=1e-5, abs=1e-6)


def _pg_batch(targets, logq_old, logp_sampler, advantage):
    return {"targets": targets, "value_logq_old": logq_old, "value_logp_sampler": logp_sampler,
            "value_advantage": advantage, "origin": torch.full((targets.shape[0],), 2)}


def test_minillm_pg_on_policy_gradient_is_advantage_weighted_score():
    """Fresh samples (q_theta = q_old) and alpha = 0 (w = 1): no clipping acts, and the
    gradient is exactly -A_t * grad log q(y_t)."""
    torch.manual_seed(1)
    s = torch.randn(2, 5, 6, requires_grad=True)
    y = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [0, 5, 4, 4, 2]])
    adv = torch.randn(2, 5)
    logq = rl.token_logp(s.detach(), y)
    fn, needs_teacher = rl.minillm_pg()
    assert not needs_teacher  # the reward was computed with the rollouts
    fn(s, None, _pg_batch(y, logq, logq, adv)).sum().backward()
    leaf = s.detach().clone().requires_grad_(True)
    (-(adv * rl.token_logp(leaf, y))).sum().backward()
    torch.testing.assert_close(s.grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_minillm_pg_clips_a_stale_ratio_and_applies_importance_weights():
    fn, _ = rl.minillm_pg(clip=0.2)
    old = torch.tensor([[math.log(0.25)], [math.log(0.25)]])  # q_theta = 0.5: ratio 2 > 1.2
    y = torch.tensor([[0], [1]])
    adv = torch.tensor([[1.0], [-1.0]])  # row 0 rewarded, row 1 punished
    s = torch.zeros(2, 1, 2, requires_grad=True)
    fn(s, None, _pg_batch(y, old, old, adv)).sum().backward()
    assert s.grad[0].abs().sum() == 0  # A > 0 and ratio above 1 + clip: clipped
    assert s.grad[1].abs().sum() > 0   # A < 0: the unclipped branch is the max
    # An importance weight multiplies the ratio: w = 0.5 brings ratio 2 back to 1, unclipped.
    s3 = torch.zeros(2, 1, 2, requires_grad=True)
    fn(s3, None, _pg_batch(y, old, old + math.log(2), adv)).sum().backward()
    assert s3.grad[0].abs().sum() > 0


def _rollout_rows(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [Example([1], [5] * n, {}, "student",
                    {"logp_teacher": (torch.randn(n, generator=g) - 2).tolist(),
                     "logq_old": (torch.randn(n, generator=g) - 2).tolist()}) for n in lengths]


def test_minillm_advantages_by_hand():
    """r_t = clip((log p - log q_old) / scaling), the length-normalized discounted return, then
    whitened over every token of every row at once."""
    rows = _rollout_rows([3, 1, 4], seed=5)
    got = rl.minillm_advantages(rows, gamma=0.9, reward_scaling=0.5, reward_clip=1.5)
    returns = []
    for e in rows:
        r = [max(-1.5, min(1.5, (p - q) / 0.5)) for p, q in zip(e.values["logp_teacher"], e.values["logq_old"],
                                                                 strict=True)]
        returns.append([sum(0.9 ** (k - t) * r[k] for k in range(t, len(r))) / (len(r) - t) for t in range(len(r))])
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat) + 1e-8)
    for a, ref in zip(got, returns, strict=True):
        assert a == pytest.approx([(x - mean) / std for x in ref], rel=1e-6, abs=1e-9)


def test_minillm_advantages_over_two_processes_equal_one():
    """Each process whitens with the statistics of both (a sum over processes): the store split
    over 2 processes gets the advantages the whole store gets on 1."""
    import threading

    rows = _rollout_rows([3, 5, 2, 4], seed=6)
    whole = rl.minillm_advantages(rows, 0.95, 0.5, 100.0)
    barrier, slots = threading.Barrier(2), [[None, None], [None, None]]
    out: list = [None, None]

    def process(rank: int) -> None:
        calls = iter(range(10))

        def reduce_sum(x):  # an all-reduce between the two threads
            k = next(calls)
            slots[k][rank] = x
            barrier.wait()
            total = slots[k][0] + slots[k][1]
            barrier.wait()
            return total

        out[rank] = rl.minillm_advantages(rows[2 * rank:2 * rank + 2], 0.95, 0.5, 100.0, reduce_sum)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(out[0] + out[1], whole, strict=True):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def _centered(**params):
    """A test term whose value depends on a statistic of its rows: x - mean(x) over the valid
    positions, with x the student's log-probability of the target."""

    def fn(s, t, batch):
        mask = batch["targets"] != IGNORE_INDEX
        x = rl.token_logp(s, batch["targets"])
        return (x - x[mask].mean()) ** 2

    return fn, False


from kdexp.losses.objective import TERMS  # noqa: E402

TERMS.add("test_centered", _centered)


def test_a_term_restricted_to_rows_computes_its_statistics_on_those_rows_only():
    """MiniLLM's micro-batches hold rollouts and pre-training rows: a term of the rollouts must
    not see the pt rows in any statistic (here a mean), only in its final sum."""
    torch.manual_seed(7)
    s = torch.randn(4, 5, 6)
    y = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [0, 5, 4, 4, 2],
                      [3, 3, 3, 3, 3], [1, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    origin = torch.tensor([2, 2, 3, 3])  # student, student, pt, pt
    obj = Objective.from_spec([{"loss": "test_centered", "weight": 1.0, "rows": ["student"]},
                               {"loss": "ce", "weight": 1.0, "rows": ["pt"]}])
    mixed = {"targets": y, "origin": origin}
    alone = {"targets": y[:2], "origin": origin[:2]}
    leaf = s.clone().requires_grad_(True)
    loss, parts = obj(leaf, None, mixed, obj.token_counts(mixed))
    loss.backward()  # the pt rows' ce reaches rows 2-3 only
    ref_leaf = s[:2].clone().requires_grad_(True)
    ref_loss, ref_parts = obj(ref_leaf, None, alone, obj.token_counts(alone))
    ref_loss.backward()
    assert parts["test_centered"].item() == pytest.approx(ref_parts["test_centered"].item(), rel=1e-6)
    torch.testing.assert_close(leaf.grad[:2], ref_leaf.grad)


def test_reinforce_gradient_is_minus_advantage_times_score():
    torch.manual_seed(2)
    s = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.tensor([[1, 2, IGNORE_INDEX], [3, 0, 0]])
    adv = torch.tensor([[0.5, 0.5, 0.0], [-1.0, -1.0, -1.0]])
    fn, needs_teacher = rl.reinforce()
    assert not needs_teacher
    (fn(s, None, {"targets": y, "value_advantage": adv})).sum().backward()
    logp = s.detach().log_softmax(-1)
    ref = torch.zeros_like(logp)
    for b in range(2):
        for i in range(3):
            if y[b, i] != IGNORE_INDEX:
                onehot = torch.nn.functional.one_hot(y[b, i], 4).float()
                ref[b, i] = -adv[b, i] * (onehot - logp[b, i].exp())
    torch.testing.assert_close(s.grad, ref, rtol=1e-5, atol=1e-7)


def test_taid_ce_is_kl_plus_target_entropy_with_the_kl_gradient():
    torch.manual_seed(3)
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5)
    fn, _ = rl.taid_ce(t=0.3, temperature=1.0)
    value = fn(s, t, {})
    kl = losses.divergence("taid", t=0.3)
    leaf = s.detach().clone().requires_grad_(True)
    ref = kl(leaf, t)
    target = (0.7 * s.detach().log_softmax(-1) + 0.3 * t.log_softmax(-1)).log_softmax(-1)
    entropy = -(target.exp() * target).sum(-1)
    torch.testing.assert_close(value, ref.detach() + entropy, rtol=1e-5, atol=1e-6)
    # Cross-entropy form: -sum p_t log q.
    torch.testing.assert_close(value, -(target.exp() * s.detach().log_softmax(-1)).sum(-1), rtol=1e-5, atol=1e-6)
    value.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s.grad, leaf.grad, rtol=1e-5, atol=1e-7)
    fn.divergence.params["t"] = 0.9  # the schedule moves t in place
    assert not torch.allclose(fn(s, t, {}), value)


def test_terms_restricted_to_rows_are_averaged_over_their_own_tokens():
    """DistiLLM-2: skl on the teacher's rows, srkl on the student's; each a mean over its rows."""
    torch.manual_seed(4)
    s, t = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    y = torch.tensor([[1, 2, 3, IGNORE_INDEX], [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [4, 4, 4, 4]])
    batch = {"targets": y, "origin": torch.tensor([1, 2, 2])}  # teacher, student, student
    obj = Objective.from_spec([{"loss": "skl", "weight": 1.5, "alpha": 0.1, "rows": ["teacher"]},
                               {"loss": "srkl", "weight": 0.5, "alpha": 0.1, "rows": ["student"]}])
    counts = obj.token_counts(batch)
    assert counts == {"skl": 3, "srkl": 5}
    loss, parts = obj(s, t, batch, counts)
    mask = y != IGNORE_INDEX
    skl = losses.divergence("skl", alpha=0.1)(s, t)
    srkl = losses.divergence("srkl", alpha=0.1)(s, t)
    ref_skl = skl[0][mask[0]].sum() / 3
    ref_srkl = (srkl[1:][mask[1:]]).sum() / 5
    assert parts["skl"].item() == pytest.approx(ref_skl.item(), rel=1e-5)
    assert parts["srkl"].item() == pytest.approx(ref_srkl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(1.5 * ref_skl.item() + 0.5 * ref_srkl.item(), rel=1e-5)


def test_taid_schedule_follows_the_papers_update():
    div = losses.divergence("taid", t=0.0)

    class Ctx:
        max_steps = 100

    sched = rl.TaidSchedule(div, "taid_ce", t_start=0.4, t_end=1.0, alpha=0.05, beta=0.5)
    assert div.params["t"] == 0.4
    sched.after_step(Ctx, 1, {"taid_ce": 2.0})  # first step: only remembers the loss
    assert sched.t == 0.4
    sched.after_step(Ctx, 2, {"taid_ce": 1.0})  # delta = 0.5, m = 0.25
    rise = 0.05 / (1 + math.exp(-0.25)) * 0.6
    assert sched.t == pytest.approx(max(0.4 + 0.6 * 2 / 100, 0.4 + rise))
    assert div.params["t"] == sched.t
    ts = [sched.t]
    for step in range(3, 101):
        sched.after_step(Ctx, step, {"taid_ce": 1.0 / step})
        ts.append(sched.t)
        assert sched.t >= 0.4 + 0.6 * step / 100 - 1e-12  # never below the linear floor
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False)) and ts[-1] == pytest.approx(1.0)
    state = sched.state_dict()
    again = rl.TaidSchedule(losses.divergence("taid", t=0.0), "taid_ce", 0.4, 1.0, 0.05, 0.5)
    again.load_state_dict(state)
    assert again.t == sched.t and again.divergence.params["t"] == sched.t


# --- sources on the tiny models ---------------------------------------------------------------


def test_decisions_are_shared_by_ranks_and_samples_are_not(ctx):
    a = ctx.uniform("x", 3, 0)
    assert a == ctx.uniform("x", 3, 0) and a != ctx.uniform("x", 4, 0)
    g0 = ctx.generator("s", 1).initial_seed()

    other = Context.__new__(Context)
    other.__dict__.update(ctx.__dict__)
    other.accelerator = type("A", (), {"process_index": 1, "num_processes": 2, "device": torch.device("cpu")})()
    assert other.uniform("x", 3, 0) == a  # another rank draws the same decision
    assert other.generator("s", 1).initial_seed() != g0  # and samples other tokens


def test_processes_that_drew_different_decisions_stop_the_run(ctx):
    """The loop's per-step check: every rank's (count, sum) of decisions must match."""
    def rank(draws: list[float], peer: list[float]) -> Context:
        other = Context.__new__(Context)
        other.__dict__.update(ctx.__dict__)
        other._drawn = list(draws)
        peer_digest = torch.tensor([[float(len(peer)), float(sum(peer))]], dtype=torch.float64)
        other.accelerator = type("A", (), {"process_index": 0, "num_processes": 2, "device": torch.device("cpu"),
                                           "gather": staticmethod(lambda t: torch.cat([t, peer_digest]))})()
        return other

    same = [ctx.uniform("gkd", 5, 0), ctx.uniform("gkd", 5, 1)]
    rank(same, same).check_decisions(5)  # agreement passes, and clears the step's record
    with pytest.raises(RuntimeError, match="processes drew different batch-source decisions at step 5"):
        rank(same, same[:1]).check_decisions(5)  # the peer drew one decision fewer
    with pytest.raises(RuntimeError, match="different batch-source decisions"):
        rank(same, [same[0], 0.5]).check_decisions(5)  # or another value
    alone = rank([], [])
    alone.accelerator.num_processes = 1
    alone.uniform("x", 1)
    alone.check_decisions(1)
    assert alone._drawn == []


def test_on_policy_rows_are_student_samples_with_prompt_and_post_eos_masked(ctx):
    src = sources.OnPolicy(sources.constant(1.0), sources.Source())
    rows = src.micro_batch(ctx, [0, 1, 2, 3], step=0, micro=0)
    assert all(r.origin == "student" for r in rows) and src.metrics()["student_fraction"] == 1.0
    for r, i in zip(rows, [0, 1, 2, 3], strict=True):
        assert r.prompt_ids == ctx.train[i].prompt_ids and r.response_ids != ctx.train[i].response_ids
        assert 1 <= len(r.response_ids) <= 12
        assert ctx.tokenizer.eos_token_id not in r.response_ids[:-1]
    batch = collate_train(rows, ctx.tokenizer.pad_token_id)
    for b, r in enumerate(rows):
        p, n = len(r.prompt_ids), len(r.response_ids)
        valid = (batch["targets"][b] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert valid == list(range(p - 1, p - 1 + n))  # the response only: no prompt, nothing past it
        assert batch["targets"][b, p - 1:p - 1 + n].tolist() == r.response_ids
        assert batch["value_logq_old"][b, p - 1:p - 1 + n].tolist() == pytest.approx(r.values["logq_old"])
    none = sources.OnPolicy(sources.constant(0.0), sources.Source())
    assert none.micro_batch(ctx, [0, 1], 0, 0) == [ctx.train[0], ctx.train[1]]


def test_imitkd_share_of_student_sequences_follows_the_decay(ctx):
    p = sources.exponential_decay(200.0)
    assert p(0, 10) == 0 and p(10, 10) == pytest.approx(1 - 1 / 200)
    src = sources.OnPolicy(p, sources.Source(), per_sequence=True)
    first = src.micro_batch(ctx, list(range(8)), step=0, micro=0)
    assert all(r.origin == "data" for r in first)
    late = src.micro_batch(ctx, list(range(8)), step=10, micro=0)
    assert sum(r.origin == "student" for r in late) >= 6


def test_cached_teacher_outputs_are_reused(ctx, tmp_path):
    src = sources.TeacherOutputs()
    src.setup(ctx, resumed=False)
    files = list((tmp_path / "cache").glob("teacher-outputs-*.jsonl"))
    assert len(files) == 1 and len(src.outputs) == len(ctx.train)
    assert all(o.origin == "teacher" and o.prompt_ids == e.prompt_ids for o, e in zip(src.outputs, ctx.train, strict=True))
    files[0].write_text("\n".join("[7]" for _ in ctx.train) + "\n")  # a second run reads the file
    again = sources.TeacherOutputs()
    again.setup(ctx, resumed=False)
    assert all(o.response_ids == [7] for o in again.outputs)
    assert again.micro_batch(ctx, [2, 0], 0, 0)[0].prompt_ids == ctx.train[2].prompt_ids


def test_distillm_buffer_fills_then_replays_and_phi_rises_on_worse_validation(ctx):
    src = sources.AdaptiveOffPolicy(init_threshold=1.0, loss_eps=0.1, capacity=8, replay_ratio="decreasing")
    src.micro_batch(ctx, [0, 1, 2, 3], step=9, micro=0)  # fresh share ~0 late in training,
    src.micro_batch(ctx, [4, 5, 6, 7], step=9, micro=1)  # but the buffer is not full yet
    assert len(src.buffer) == 8 and src.counts["fresh"] == 2
    replay = src.micro_batch(ctx, [8, 9, 10, 11], step=9, micro=2)
    assert src.counts["replay"] == 1 and all(any(r is b for b in src.buffer) for r in replay)
    low = sources.AdaptiveOffPolicy(init_threshold=0.0, loss_eps=0.1, capacity=8, replay_ratio="decreasing")
    assert all(r.origin == "data" for r in low.micro_batch(ctx, [0, 1], 0, 0))
    low.after_validation(ctx, 1, 2.0)   # the reference
    low.after_validation(ctx, 2, 2.05)  # not worse by loss_eps
    assert low.phi == 0.0
    low.after_validation(ctx, 3, 2.2)
    assert low.phi == pytest.approx(0.1) and low.reference_loss == 2.2
    assert [src.fresh_threshold(s, 10) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_sgo_outputs_are_regenerated_refresh_times(ctx):
    src = sources.Pregenerated(refresh=2)
    assert src.refresh_steps(9) == [3, 6]
    src.setup(ctx, resumed=False)
    first = [o.response_ids for o in src.outputs]
    assert src.generations == 1 and all(o.origin == "student" for o in src.outputs)
    for step in range(1, 10):
        src.after_step(ctx, step, {})
    assert src.generations == 3 and [o.response_ids for o in src.outputs] != first


def test_minillm_store_serves_ppo_epochs_passes_then_refills(ctx):
    src = rl.RolloutStore(num_rollouts=4, ppo_epochs=2, teacher_mix=0.2)
    seen = [src.micro_batch(ctx, [0, 1], step, 0) for step in range(4)]
    assert src.refills == 1
    ids = [tuple(r.response_ids) for batch in seen for r in batch]
    assert len(set(ids)) <= 4 and sorted(ids[:4]) == sorted(ids[4:])  # each rollout once per epoch
    src.micro_batch(ctx, [0, 1], 4, 0)
    assert src.refills == 2
    alpha0 = rl.RolloutStore(num_rollouts=4, ppo_epochs=1, teacher_mix=0.0)
    for r in alpha0.micro_batch(ctx, [0, 1, 2, 3], 0, 0):  # importance weights 1 when alpha = 0
        assert r.values["logp_sampler"] == pytest.approx(r.values["logq_old"], abs=1e-5)


def test_minillm_store_is_full_on_a_split_smaller_than_it(ctx):
    """More rollouts than training prompts: the store wraps around the split and still holds
    num_rollouts rows, so with several processes every rank's store is as large and all ranks
    refill (an all-reduce) at the same micro-batch."""
    n = len(ctx.train) + 6
    src = rl.RolloutStore(num_rollouts=n, ppo_epochs=1, teacher_mix=0.0)
    src.micro_batch(ctx, [0, 1], 0, 0)
    assert len(src.store) == n and len(src.order) == n


def test_minillm_store_from_an_older_checkpoint_is_refilled(ctx):
    """Rollouts saved before advantages were computed at refill time carry none: the first
    micro-batch after resuming refills the store instead of failing."""
    src = rl.RolloutStore(num_rollouts=4, ppo_epochs=2, teacher_mix=0.0)
    src.micro_batch(ctx, [0, 1], 0, 0)
    state = src.state_dict()
    for row in state["store"]:
        row["values"].pop("advantage")
    resumed = rl.RolloutStore(num_rollouts=4, ppo_epochs=2, teacher_mix=0.0)
    resumed.load_state_dict(state)
    rows = resumed.micro_batch(ctx, [0, 1], 1, 0)
    assert resumed.refills == state["refills"] + 1 and all("advantage" in r.values for r in rows)


@pytest.mark.parametrize("teacher_mix", [0.0, 0.5])
def test_minillm_rollouts_carry_the_teachers_log_probabilities_and_whitened_advantages(ctx, teacher_mix):
    """The reward's log p(y_t), recorded while sampling, is the teacher's log-probability of the
    token in a full forward pass over the sequence; the advantages of the store have mean 0 and
    variance 1 over all its tokens."""
    src = rl.RolloutStore(num_rollouts=4, ppo_epochs=1, teacher_mix=teacher_mix)
    rows = src.micro_batch(ctx, [0, 1, 2, 3], 0, 0)
    batch = collate_train(rows, ctx.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = ctx.teacher.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(batch["value_logp_teacher"], rl.token_logp(logits, batch["targets"]),
                               rtol=1e-4, atol=1e-4)
    flat = torch.tensor([a for r in rows for a in r.values["advantage"]], dtype=torch.float64)
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert flat.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    again = rl.minillm_advantages(rows, src.gamma, src.reward_scaling, src.reward_clip)
    for r, a in zip(rows, again, strict=True):
        assert r.values["advantage"] == pytest.approx(a, rel=1e-9, abs=1e-12)


def test_gkd_rl_advantages_are_leave_one_out(ctx, monkeypatch):
    src = rl.Rewarded("exact_match")
    monkeypatch.setattr(src, "score", lambda c, rows: [1.0, 0.0, 0.0, 1.0])
    rows = src.micro_batch(ctx, [0, 1, 2, 3], 0, 0)
    adv = [r.values["advantage"][0] for r in rows]
    assert adv == pytest.approx([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3])
    assert all(len(set(r.values["advantage"])) == 1 for r in rows)


def test_rewards_score_the_decoded_response(ctx):
    src = rl.Rewarded("exact_match")
    ref = ctx.train[0]
    right = ref.with_response(ref.response_ids, "student")
    wrong = ref.with_response(ctx.tokenizer("zebra")["input_ids"], "student")
    assert src.score(ctx, [right, wrong]) == [1.0, 0.0]
    loglik = rl.teacher_loglik(ctx, [right, wrong])
    assert loglik[0] > loglik[1]  # the teacher prefers the reference


def test_pt_corpus_reads_jsonl_and_txt(ctx, tmp_path):
    from kdexp.errors import UserError

    (tmp_path / "pt.jsonl").write_text('{"text": "Alice is a doctor."}\n{"text": "Bob"}\n')
    docs = sources.load_pt_corpus(str(tmp_path / "pt.jsonl"), ctx.tokenizer, 160)
    assert [d.origin for d in docs] == ["pt", "pt"] and docs[0].response_ids[-1] == ctx.tokenizer.eos_token_id
    (tmp_path / "pt.txt").write_text("one line\n\nanother line\n")
    assert len(sources.load_pt_corpus(str(tmp_path / "pt.txt"), ctx.tokenizer, 160)) == 2
    with pytest.raises(UserError, match="is not a file"):
        sources.load_pt_corpus(str(tmp_path / "missing.jsonl"), ctx.tokenizer, 160)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="'text' field"):
        sources.load_pt_corpus(str(tmp_path / "bad.jsonl"), ctx.tokenizer, 160)


def test_example_values_are_aligned_with_targets():
    e = Example([5, 6], [7, 8, 9], {}, "student", {"logq_old": [-1.0, -2.0, -3.0]})
    d = Example([5], [7], {})
    batch = collate_train([e, d], pad_id=0)
    assert batch["origin"].tolist() == [2, 0]
    assert batch["value_logq_old"][0].tolist() == [0.0, -1.0, -2.0, -3.0, 0.0]
    assert batch["targets"][0].tolist() == [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX]
    assert batch["value_logq_old"][1].abs().sum() == 0
