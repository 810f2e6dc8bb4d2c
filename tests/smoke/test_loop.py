"""The training loop in-process (``kdexp.train.run`` on a composed config, no subprocess): what
it does around the steps, checked through its records."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from kdexp import train
from kdexp.config import conf_dir, register_resolvers
from tests.conftest import FAST

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

QUICK = [*FAST, "train.save_every=0", "eval.max_samples=2", "eval.seeds=[10]", "eval.teacher=false",
         "rollout.max_new_tokens=8"]


def composed(*overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="test"):
        return compose("config", overrides=[*QUICK, *overrides])


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_distillm_compares_its_first_validation_with_the_loss_before_training(tmp_path, monkeypatch):
    """DistiLLM's reference (finetune.py) validates before the loop: with init_threshold 0 and
    loss_eps 0.1, a loss of 2.0 before training and 2.50 at the first validation raise phi to
    0.1 there; a run whose first validation is its reference never could."""
    losses = iter([2.0, 2.50, 2.55])
    monkeypatch.setattr(train, "validate", lambda cfg, model, tok, valid: {
        "valid/loss": next(losses), "valid/rougeL": 0.0, "valid/exact_match": 0.0})
    cfg = composed("method=distillm", "method.init_threshold=0", "method.loss_eps=0.1", "train.eval_every=2")
    train.run(cfg, tmp_path)
    rows = records(tmp_path)
    assert [r["step"] for r in rows if "valid/loss" in r] == [0, 2, 4]
    phi = {r["step"]: r["method/phi"] for r in rows if "method/phi" in r}
    assert phi[2] == 0.0 and phi[4] == pytest.approx(0.1) and phi[6] == pytest.approx(0.1)


@pytest.mark.parametrize("loss_mean", ["token", "sequence"])
def test_validation_reports_the_loss_mean_of_eval(tmp_path, loss_mean):
    """The validation loss (which DistiLLM's scheduler consumes) is the mean eval.loss_mean
    asks for, the number kdexp eval reports."""
    from kdexp.data import load_examples
    from kdexp.evaluation import teacher_forced_nll
    from kdexp.models import load_model

    cfg = composed(f"eval.loss_mean={loss_mean}", "train.eval_samples=1")
    model, tok = load_model(cfg.teacher, "teacher")
    valid = load_examples(cfg.data, tok, ["valid"])["valid"]
    got = train.validate(cfg, model, tok, valid)["valid/loss"]
    assert got == pytest.approx(teacher_forced_nll(model, valid, tok.pad_token_id, per=loss_mean), rel=1e-6)
    other = "sequence" if loss_mean == "token" else "token"
    assert got != pytest.approx(teacher_forced_nll(model, valid, tok.pad_token_id, per=other), rel=1e-4)


def test_a_new_teacher_kind_trains_without_a_change_to_the_loop(tmp_path, monkeypatch):
    """A kind the loop never saw (several teachers, as the next issues add them: the mixture of
    their distributions) is a subclass of Teacher and a builder in teachers.SOURCES. Averaging
    a teacher with itself must train exactly as that teacher does."""
    import math

    import torch

    from kdexp import teachers

    class Mixture(teachers.Teacher):
        kind = "mixture"

        def __init__(self, members):
            super().__init__(members[0].accelerator, members[0].vocab)
            self.members, self.calls = members, 0

        def distributions(self, batch):
            self.calls += 1
            logp = torch.stack([torch.log_softmax(m.distributions(batch).float(), -1) for m in self.members])
            return torch.logsumexp(logp, 0) - math.log(len(self.members))

    built = []

    def mixture(cfg, plan, accelerator, student, tokenizer, inputs):
        live = teachers.live(cfg, plan, accelerator, student, tokenizer, inputs)
        built.append(Mixture([live, live]))
        return built[-1]

    overrides = ("method=kd", "train.max_steps=3", "train.log_every=1", "train.eval_every=0")
    for run in ("one", "mixture"):
        (tmp_path / run).mkdir()
    train.run(composed(*overrides), tmp_path / "one")
    monkeypatch.setitem(teachers.SOURCES._items, "live", mixture)
    train.run(composed(*overrides), tmp_path / "mixture")
    assert built and built[0].calls == 3 * 2  # every micro-batch of every step
    one, mixed = ([r["train/fkl"] for r in records(tmp_path / run) if "train/fkl" in r] for run in ("one", "mixture"))
    assert len(one) == 3 and mixed == pytest.approx(one, rel=1e-5)
