"""The analyses on models whose distributions are known in closed form.

A ``TableLM`` is a bigram model: the next-token logits are a fixed row of a table picked by the
current token. Sampling from it is a Markov chain, so the per-step error of the exposure-bias
analysis, the speculative acceptance rate and the per-step KL have exact values: with the
teacher's transition matrix P, the student's Q, the prompt's last token s and
``k[x] = KL(P[x] || Q[x])``, the state before response step t is distributed as ``e_s P^(t-1)``
under the teacher and ``e_s Q^(t-1)`` under the student, so

    eps_t = e_s P^(t-1) k,   regret_t = e_s Q^(t-1) k,   alpha_t = e_s P^(t-1) a,

with ``a[x] = sum_y min(P[x, y], Q[x, y])``. The estimators must land on these within
sampling error.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdexp import analyze as an
from kdexp.data.encode import Example
from kdexp.evaluation import analysis as est
from kdexp.evaluation import reports

EOS, PAD = 3, 3


class TableLM(torch.nn.Module):
    """Logits of the next token = ``table[current token]``; no context beyond one token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone().float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


def table(rows: list[list[float]]) -> torch.Tensor:
    """Logits from probability rows over tokens 0..2; EOS (3) gets a negligible probability."""
    p = torch.tensor(rows, dtype=torch.float64)
    logits = torch.cat([p.log(), torch.full((len(rows), 1), -40.0, dtype=torch.float64)], 1)
    return torch.cat([logits, logits[:1]])  # a row for EOS itself (never reached)


TEACHER = table([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
STUDENT = table([[0.4, 0.4, 0.2], [0.2, 0.5, 0.3], [0.5, 0.2, 0.3]])


def chain(logits: torch.Tensor) -> torch.Tensor:
    return logits.double().softmax(-1)


def exact(start: int, steps: int, per_state: torch.Tensor, transition: torch.Tensor) -> list[float]:
    state = torch.zeros(len(transition), dtype=torch.float64)
    state[start] = 1
    out = []
    for _ in range(steps):
        out.append(float(state @ per_state))
        state = state @ transition
    return out


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def prompts(n: int, start: int = 0) -> list[Example]:
    return [Example([start], [], {"references": []}) for _ in range(n)]


def draws(model, n_prompts: int, n_samples: int, steps: int, seed: int, origin: str):
    spec = an.RolloutSpec(do_sample=True, max_new_tokens=steps)
    return an.sample_responses(model, prompts(n_prompts), spec, n_samples, seed, EOS, PAD, 512, None, origin)


def within(estimate: list[float], se: list[float], truth: list[float], z: float = 4.5) -> None:
    for e, s, t in zip(estimate, se, truth, strict=True):
        assert abs(e - t) <= z * s + 1e-6, (e, s, t)  # float32 logits


def test_exposure_estimators_converge_to_the_markov_chain_values():
    teacher, student = TableLM(TEACHER), TableLM(STUDENT)
    steps = 6
    out = an.exposure_curves(student, teacher, draws(teacher, 500, 4, steps, 1, "teacher"),
                             draws(student, 500, 4, steps, 2, "student"), PAD, 512)
    p, q = chain(TEACHER), chain(STUDENT)
    k = kl_rows(p, q)
    eps_true, reg_true = exact(0, steps, k, p), exact(0, steps, k, q)
    assert out["l"] == list(range(1, steps + 1)) and out["count_teacher"] == [2000] * steps
    within(out["eps_t"], out["eps_t_se"], eps_true)
    within(out["regret_t"], out["regret_t_se"], reg_true)
    assert out["eps_t"][0] == pytest.approx(float(k[0]), abs=1e-6)  # step 1: the prompt's token, no sampling
    truth = est.exposure_metrics(eps_true, reg_true)
    within(out["ExAccErr"], out["ExAccErr_se"], truth["ExAccErr"])
    within(out["AccErr"], out["AccErr_se"], truth["AccErr"])
    # Not a degenerate case: here the student's own prefixes lead to states where it errs less
    # (ExAccErr about -12 %), and the estimate finds the sign.
    assert truth["ExAccErr"][-1] < -5 and out["ExAccErr"][-1] < 0


def test_a_student_equal_to_its_teacher_has_no_error_and_full_acceptance():
    teacher, student = TableLM(TEACHER), TableLM(TEACHER)
    reps = draws(teacher, 50, 2, 5, 3, "teacher")
    out = an.exposure_curves(student, teacher, reps, draws(student, 50, 2, 5, 4, "student"), PAD, 64)
    assert max(out["eps_t"]) == max(out["regret_t"]) == 0.0
    assert all(math.isnan(x) for x in out["ExAccErr"])  # 0 / 0: undefined, not 0
    spec = an.speculative_acceptance(student, teacher, reps, PAD, 64, seed=0)
    assert spec["alpha"] == pytest.approx(1.0, abs=1e-6) and spec["empirical"] == 1.0
    assert spec["expected_tokens"]["4"] == pytest.approx(5.0, abs=1e-5)
    refs = [e.with_response([0, 1, 2, EOS], "data") for e in prompts(4)]
    diff = an.difficulty(student, teacher, refs, PAD, 64, n_buckets=4)
    assert diff["kl_all"] == pytest.approx(0.0, abs=1e-6) and diff["top1_agreement_all"] == 100.0
    curves = an.kl_curves(student, teacher, refs, reps, PAD, 64)
    assert curves["teacher_forced"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert curves["free_running"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_speculative_acceptance_matches_the_chain_and_the_simulated_test():
    teacher, student = TableLM(TEACHER), TableLM(STUDENT)
    steps = 5
    out = an.speculative_acceptance(student, teacher, draws(teacher, 400, 5, steps, 5, "teacher"), PAD, 512,
                                    gammas=[1, 3], seed=7)
    p, q = chain(TEACHER), chain(STUDENT)
    a = torch.minimum(p, q).sum(-1)
    truth = exact(0, steps, a, p)
    within(out["per_step"]["mean"], out["per_step"]["se"], truth)
    mean_true = sum(truth) / steps
    n = out["tokens"]
    assert n == 2000 * steps
    assert out["alpha"] == pytest.approx(mean_true, abs=4.5 * 0.2 / math.sqrt(2000))
    # The accept / reject simulation is a Bernoulli(alpha_t) per token.
    assert out["empirical"] == pytest.approx(out["alpha"], abs=4.5 * 0.5 / math.sqrt(n))
    alpha = out["alpha"]
    assert out["expected_tokens"]["3"] == pytest.approx((1 - alpha ** 4) / (1 - alpha))


def test_teacher_forced_curves_are_exact_on_given_references():
    teacher, student = TableLM(TEACHER), TableLM(STUDENT)
    k = kl_rows(chain(TEACHER), chain(STUDENT))
    refs = [Example([0], [1, 2, 2, EOS], {}), Example([2], [0, EOS], {})]
    out = an.kl_curves(student, teacher, refs, [refs], PAD, 8)["teacher_forced"]
    # Step t is predicted from the token before it: the prompt's, then the response's.
    assert out["mean"][0] == pytest.approx(float((k[0] + k[2]) / 2), rel=1e-5)
    assert out["mean"][1] == pytest.approx(float((k[1] + k[0]) / 2), rel=1e-5)
    assert out["mean"][2] == pytest.approx(float(k[2]), rel=1e-5) and out["count"] == [2, 2, 1, 1]
    assert math.isnan(out["se"][3])  # one sequence: no error bar
    short = an.kl_curves(student, teacher, refs, [refs], PAD, 8, min_count=2)["teacher_forced"]
    assert short["count"] == [2, 2] and short["kl"] == out["kl"]  # the curve stops, the mean does not
    assert an.kl_curves(student, teacher, refs, [refs], PAD, 8, min_count=50)["teacher_forced"]["count"] == [2, 2]


def test_difficulty_and_calibration_read_the_reference_tokens():
    teacher, student = TableLM(TEACHER), TableLM(STUDENT)
    refs = [Example([0], [0, 1, 1, 2], {})]  # teacher p(target): 0.7, 0.2, 0.6, 0.3
    d = an.difficulty(student, teacher, refs, PAD, 8, n_buckets=4)
    # UNC = 0.3, 0.8, 0.4, 0.7 -> buckets [0.25, 0.5) x2, [0.5, 0.75), [0.75, 1]
    assert d["tokens"] == 4 and d["count"] == [0, 2, 1, 1]
    assert d["unc"][1] == pytest.approx(0.35, abs=1e-6)
    cal = an.calibration(teacher, refs, PAD, 8, n_bins=10)
    # Predictions: argmax rows 0, 0, 1, 1 -> correct, wrong, correct, wrong; confidences .7 .7 .6 .6
    assert cal["n"] == 4
    assert cal["ece"] == pytest.approx((2 * abs(0.5 - 0.7) + 2 * abs(0.5 - 0.6)) / 4, abs=1e-6)


def test_diversity_on_hand_made_samples():
    out = an.diversity([["a b c", "a b d"], ["x y", "x y"]])
    # prompt 1: unigrams a b c a b d -> 4 distinct / 6; prompt 2: x y x y -> 2 / 4
    assert out["distinct_1"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert out["distinct_2"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert out["corpus_distinct_1"] == pytest.approx(6 / 10)
    assert out["self_bleu"] > 0 and out["mean_words"] == 2.5


def test_sampling_is_seeded_and_replicates_differ():
    teacher = TableLM(TEACHER)
    a, b = draws(teacher, 20, 2, 6, 9, "teacher"), draws(teacher, 20, 2, 6, 9, "teacher")
    assert [e.response_ids for e in a[0]] == [e.response_ids for e in b[0]]
    assert [e.response_ids for e in a[0]] != [e.response_ids for e in a[1]]


def test_summaries_and_tables_of_every_analysis(tmp_path):
    """Each analysis's summary, figure and W&B table from results computed on table models."""
    from omegaconf import OmegaConf

    from tests.unit.test_routing import LAYER0, LAYER1, RouterLM

    cfg = OmegaConf.create({"analyze": {"temperature": 1.0, "n_samples": 2, "length": None}})
    teacher, student = TableLM(TEACHER), TableLM(STUDENT)
    reps = draws(teacher, 10, 2, 4, 1, "teacher")
    own = draws(student, 10, 2, 4, 2, "student")
    refs = [e.with_response([0, 1, 2, EOS], "data") for e in prompts(4)]
    results = {
        "exposure": {"sample": an.exposure_curves(student, teacher, reps, own, PAD, 64)},
        "difficulty": an.difficulty(student, teacher, refs, PAD, 64),
        "calibration": an.calibration(student, refs, PAD, 64),
        "diversity": an.diversity([["a b", "a c"], ["b c", "b c"]]),
        "speculative": an.speculative_acceptance(student, teacher, reps, PAD, 64),
        "curves": an.kl_curves(student, teacher, refs, own, PAD, 64),
        "routing": an.routing(RouterLM([LAYER0, LAYER1]), refs, [rep[:4] for rep in own], PAD, 64),
    }
    assert set(results) == set(an.ANALYSES) == set(reports.PLOTS) == set(reports.SUMMARIES)
    for name, r in results.items():
        res = {"one": r, "two": r}
        path = reports.PLOTS[name](res, tmp_path / f"{name}.png", cfg)
        assert path.read_bytes()[:4] == b"\x89PNG"
        rows = reports.SUMMARIES[name](res, cfg)
        assert list(rows) == ["one", "two"] and rows["one"] == rows["two"]
        table = reports.markdown(name, rows)
        assert table.count("\n| one |") == 1
        for columns, data in reports.long_tables(name, res).values():
            assert all(len(row) == len(columns) for row in data) and data


def test_cli_lists_the_same_analyses():
    from kdexp import cli

    assert set(cli.ANALYSES) == set(an.ANALYSES)


def test_analyze_arguments_become_overrides():
    from kdexp import cli

    args = cli._analyze_args(["exposure", "runs/a", "--cfg", "job", "runs/it's", "analyze.n_samples=2"])
    assert args == ["--cfg", "job", "analyze.name=exposure", "analyze.models=['runs/a','runs/it\\'s']",
                    "analyze.n_samples=2", "hydra.run.dir=runs/${now:%Y-%m-%d}/${now:%H-%M-%S}_analyze-exposure"]
    with pytest.raises(SystemExit):
        cli._analyze_args(["exposre"])


def test_analyze_settings_are_checked(compose):
    from kdexp import config

    cfg = compose(["analyze.n_samples=0", "analyze.top_p=0", "analyze.gammas=[]", "analyze.max_samples=null"])
    found = config.problems(cfg, keys=["analyze"])
    assert any(p.startswith("analyze.n_samples must be an integer > 0") for p in found)
    assert any(p.startswith("analyze.top_p must be in (0, 1]") for p in found)
    assert any(p.startswith("analyze.gammas must be a non-empty list") for p in found)
    assert not any("max_samples" in p for p in found) and len(found) == 3


def test_an_analysis_run_directory_is_named_after_the_analysis():
    from kdexp.cli import command_args
    args = command_args("analyze", ["exposure", "runs/a", "runs/b"])
    assert "hydra.run.dir=runs/${now:%Y-%m-%d}/${now:%H-%M-%S}_analyze-exposure" in args
    assert "analyze.name=exposure" in args and "analyze.models=['runs/a','runs/b']" in args
    mine = command_args("analyze", ["calibration", "runs/a", "hydra.run.dir=out/cal"])
    assert [a for a in mine if a.startswith("hydra.run.dir=")] == ["hydra.run.dir=out/cal"]
