"""The known sequence teacher (kdexp/known/chain.py, markov.py): the model's probabilities are
the chain's, the dynamic programs equal brute-force enumeration, and `kdexp analyze exposure`'s
estimator lands within a few standard errors of the exact curves."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from kdexp.errors import UserError
from kdexp.known import markov
from kdexp.known.chain import EOS, Chain, records

TINY = Chain(states=2, order=2, stop=0.3, sharpness=1.5, seed=3, max_response=3)


@pytest.fixture(scope="module")
def bundled():
    from kdexp.models import asset_path, load_model
    teacher, tok = load_model({"name_or_path": asset_path("markov-teacher"), "init": "auto"}, "teacher")
    torch.manual_seed(0)
    student, _ = load_model({"name_or_path": asset_path("markov-student"), "init": "auto"}, "student")
    return teacher.eval(), student.eval(), tok


def chain_log_prob(chain: Chain, prompt: list[int], response: list[int]) -> float:
    seq, total = list(prompt), 0.0
    for token in response:
        total += math.log(chain.probs(seq)[token])
        seq.append(token)
    return total


def test_the_bundled_teacher_gives_the_chains_sequence_probabilities_exactly(bundled):
    """Every response of the chain scored by the Hugging Face model (teacher-forced, batched
    with padding) has the log-probability the chain's definition gives, token by token."""
    teacher, _, _ = bundled
    chain = Chain()
    rng = random.Random(5)
    samples = [chain.sample(rng) for _ in range(32)]
    width = max(len(p) + len(r) for p, r in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(samples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
    with torch.no_grad():
        log_q = teacher(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    for i, (p, r) in enumerate(samples):
        rows = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        model = float(log_q[i, rows, torch.tensor(r)].sum())
        assert model == pytest.approx(chain_log_prob(chain, p, r), abs=1e-4 * max(1, len(r)))


def test_incremental_decoding_and_left_padding_match_the_full_pass(bundled):
    teacher, student, _ = bundled
    ids = torch.tensor([[EOS, EOS, 3, 7, 1, 5], [4, 2, 9, 9, 11, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for model in (teacher, student):
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits
            out = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
            parts = [out.logits]
            for t in range(3, ids.shape[1]):
                out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, : t + 1],
                            past_key_values=out.past_key_values, use_cache=True)
                parts.append(out.logits)
            alone = model(input_ids=ids[:1, 2:]).logits   # the left-padded row, as it would be alone
        assert torch.equal(torch.cat(parts, 1), full)
        assert torch.equal(full[0, 2:], alone[0])


def test_generate_and_a_saved_student_round_trip(bundled, tmp_path):
    from kdexp.models import load_model
    _, student, tok = bundled
    student.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_model({"name_or_path": str(tmp_path), "init": "pretrained"})
    assert torch.equal(again.table, student.table)
    torch.manual_seed(0)
    out = again.generate(input_ids=torch.tensor([[3, 7]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                         max_new_tokens=5, do_sample=True, pad_token_id=EOS)
    assert out.shape[1] <= 7 and out[0, :2].tolist() == [3, 7]


def brute_force(teacher: torch.Tensor, student: torch.Tensor, chain: Chain) -> dict[str, float]:
    """Sequence KLs by enumerating every response of the truncated process."""
    vocab, out = chain.vocab, {"pq": 0.0, "qp": 0.0}
    prompts = [(a, b) for a in range(1, vocab) for b in range(1, vocab)]
    for a, b in prompts:
        for n in range(1, chain.max_response + 1):
            for tail in itertools.product(range(vocab), repeat=n):
                if any(t == EOS for t in tail[:-1]) or (n < chain.max_response and tail[-1] != EOS):
                    continue  # EOS only last; shorter than the maximum only when it ended
                seq, lp, lq = [a, b], 0.0, 0.0
                for t in tail:
                    lp += math.log(teacher[seq[-2], seq[-1], t])
                    lq += math.log(student[seq[-2], seq[-1], t])
                    seq.append(t)
                w = 1.0 / len(prompts)
                out["pq"] += w * math.exp(lp) * (lp - lq)
                out["qp"] += w * math.exp(lq) * (lq - lp)
    return out


def test_the_exact_sequence_kls_equal_brute_force_enumeration():
    teacher = markov.as_pairs(markov.log_table(TINY), TINY.vocab)
    g = torch.Generator().manual_seed(0)
    student = markov.as_pairs(torch.randn(TINY.vocab, TINY.vocab, generator=g, dtype=torch.float64), TINY.vocab)
    truth = markov.exact(teacher, student, markov.prompt_pairs(TINY), TINY.max_response)
    brute = brute_force(teacher, student, TINY)
    assert truth.kl_pq == pytest.approx(brute["pq"], rel=1e-10)
    assert truth.kl_qp == pytest.approx(brute["qp"], rel=1e-10)
    assert truth.alive_p[0] == pytest.approx(1.0) and truth.alive_p[1] == pytest.approx(1 - TINY.stop)


def test_the_best_order1_students_are_optima():
    """Forward: the closed form has zero gradient and beats perturbations; reverse: no
    perturbation of the L-BFGS optimum does better, and it beats the forward optimum."""
    chain = Chain(states=4, max_response=8, seed=1)
    teacher = markov.as_pairs(markov.log_table(chain), chain.vocab)
    start, steps = markov.prompt_pairs(chain), chain.max_response
    forward, kl_f = markov.best_order1(teacher, start, steps, "pq")
    reverse, kl_r = markov.best_order1(teacher, start, steps, "qp")
    x = forward.clone().requires_grad_(True)
    markov.sequence_kl(teacher, markov.as_pairs(x, chain.vocab), start, steps, "pq").backward()
    assert x.grad[1:].abs().max() < 1e-8   # row 0 (after EOS) is never used
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        noise = 0.05 * torch.randn(forward.shape, generator=g, dtype=torch.float64)
        assert float(markov.sequence_kl(teacher, markov.as_pairs(forward + noise, chain.vocab), start, steps)) > kl_f
        assert float(markov.sequence_kl(teacher, markov.as_pairs(reverse + noise, chain.vocab), start, steps,
                                        "qp")) > kl_r
    assert kl_r < float(markov.sequence_kl(teacher, markov.as_pairs(forward, chain.vocab), start, steps, "qp"))


def test_the_exposure_estimator_matches_the_exact_curves(bundled):
    """eps_t and regret_t of `kdexp analyze exposure` (its function, on 100 prompts x 4 samples
    per side) are within 4.5 standard errors of the exact curves at every step (step 1 exactly:
    its prefixes are the prompts)."""
    from kdexp.analyze import exposure_curves, sample_responses
    from kdexp.data.encode import Example
    from kdexp.rollout import RolloutSpec
    teacher, student, tok = bundled
    chain = Chain()
    prompts = [[int(t[1:]) for t in r["prompt"].split()] for r in records(chain, 100, seed="0-test")]
    examples = [Example(p, [], {}) for p in prompts]
    spec = RolloutSpec(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=chain.max_response)
    reps = {role: sample_responses(model, examples, spec, 4, seed, EOS, EOS, 64, origin=role)
            for role, model, seed in (("teacher", teacher, 1), ("student", student, 2))}
    est = exposure_curves(student, teacher, reps["teacher"], reps["student"], EOS, 64, max_steps=16)
    truth = markov.exact(markov.as_pairs(teacher, chain.vocab), markov.as_pairs(student, chain.vocab),
                         markov.prompt_pairs(chain, prompts), chain.max_response)
    for key in ("eps_t", "regret_t"):
        assert est[key][0] == pytest.approx(getattr(truth, key)[0], rel=1e-4)
        z = [(e - x) / se for e, x, se in zip(est[key][1:], getattr(truth, key)[1:], est[f"{key}_se"][1:],
                                              strict=False)]
        assert len(z) == 15 and max(abs(v) for v in z) < 4.5, (key, z)


def test_markov_data_comes_from_the_teacher_in_use(tmp_path):
    from kdexp.data.sources import load_splits
    from kdexp.models import asset_path
    cfg = {"name": "markov", "source": "markov", "max_prompt_length": 2, "max_length": 50,
           "markov": {"teacher": asset_path("markov-teacher"), "seed": 0, "n_train": 5, "n_valid": 2, "n_test": 3}}
    splits = load_splits(cfg)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [5, 2, 3]
    assert splits["test"] == records(Chain(), 3, seed="0-test")
    with pytest.raises(UserError, match="teacher=markov"):
        load_splits({**cfg, "markov": {**cfg["markov"], "teacher": asset_path("tiny-teacher")}})
    with pytest.raises(UserError, match="data.max_length=50"):
        load_splits({**cfg, "max_length": 40})


@pytest.mark.slow
def test_the_known_study_writes_its_report(tmp_path):
    """`make known`'s program end to end on its sequence part, shrunk: trains through
    `kdexp train`, scores exactly, checks `kdexp analyze exposure`, writes the report."""
    from kdexp.known import study
    assert study.main(["--parts", "sequences", "--only", "sft", "gkd-l0", "--steps", "4", "--seeds", "0",
                       "--analyze-prompts", "24", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "KNOWN_ANSWERS.md").read_text()
    assert "| sft |" in text and "| gkd-l0 |" in text and "best order-1 student by KL(p‖q)" in text
    assert "`kdexp analyze exposure`'s estimates" in text and (tmp_path / "known" / "sequences.png").stat().st_size
    results = json.loads((tmp_path / "runs" / "sft" / "seed0" / "results.json").read_text())
    assert results["split"] == "test"


def test_a_chain_of_order_three_reads_a_short_context_as_padded():
    chain = Chain(states=3, order=3)
    assert chain.context_index([1, 2]) == chain.context_index([0, 1, 2]) == 1 * 4 + 2
    assert chain.context_index([2, 1, 2, 3]) == (1 * 4 + 2) * 4 + 3


def test_the_study_refuses_to_mix_settings(tmp_path):
    from kdexp.known import study
    (tmp_path / "settings.json").write_text(json.dumps({"steps": 7, "analyze_prompts": 200, "extra": []}))
    assert study.main(["--parts", "sequences", "--steps", "4", "--out", str(tmp_path)]) == 2


def test_encoded_markov_data_is_the_chains_process(bundled, caplog):
    """Ended responses end with EOS; responses cut at max_response by the chain keep none, and
    encoding cuts nothing (no warning)."""
    from kdexp.data.encode import encode
    _, _, tok = bundled
    chain = Chain()
    recs = records(chain, 400, seed=3)
    cfg = {"name": "markov", "max_prompt_length": 2, "max_length": 50, "too_long": "error"}
    with caplog.at_level("WARNING"):
        examples = encode(recs, tok, cfg, "train")
    assert not caplog.records
    rng = random.Random(3)
    for e in examples:
        prompt, response = chain.sample(rng)
        assert e.prompt_ids == prompt and e.response_ids == response
    assert any(e.response_ids[-1] != EOS for e in examples)   # some were cut at max_response
