"""The teacher side (kdexp/teachers/): each kind answers the interface the loop uses, checked
against the model or the cache it stands for."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from kdexp.data.encode import collate_train
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.methods.online import OnlineModule, Pair
from kdexp.teachers import CachedTeacher, LiveTeacher, OnlineTeacher, Teacher
from tests.unit.test_teacher_cache import TableTeacher, Tok, examples, make

V = 12


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


class Student(torch.nn.Module):
    """Logits from token ids through an embedding and a head of ``rows`` outputs."""

    def __init__(self, rows: int = V):
        super().__init__()
        torch.manual_seed(3)
        self.embed, self.lm_head = torch.nn.Embedding(V, 5), torch.nn.Linear(5, rows)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.lm_head(self.embed(input_ids))})()


def batch_of(train):
    return collate_train(train, 0)


def test_no_teacher_gives_the_student_and_refuses_the_rest(accelerator):
    teacher, student = Teacher(accelerator), Student()
    batch = batch_of(examples())
    s, t = teacher.forward(student, batch, wanted=False)
    assert t is None and torch.equal(s, student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits)
    assert teacher.engine_module(student) is student and teacher.param_groups() == [] and teacher.evaluated() is None
    with pytest.raises(RuntimeError, match="no teacher"):
        teacher.distributions(batch)
    with pytest.raises(RuntimeError, match="no teacher"), teacher.model():
        pass


def test_a_live_teacher_is_its_frozen_model_cut_to_the_compared_width(accelerator):
    model = TableTeacher()
    teacher = LiveTeacher(accelerator, 10, model)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    batch = batch_of(examples())
    want = model.table[batch["input_ids"]][..., :10]
    assert torch.equal(teacher.distributions(batch), want) and not teacher.distributions(batch).requires_grad
    s, t = teacher.forward(Student(), batch, wanted=True)
    assert s.shape[-1] == 10 and s.requires_grad and torch.equal(t, want) and teacher.seconds > 0
    with teacher.model() as plain:
        assert plain is model and not plain.training
    assert teacher.evaluated() is model and teacher.gathered() == [model]


def test_a_cached_teacher_rebuilds_the_caches_logits_at_the_targets(accelerator, tmp_path):
    _, train, cache = make(tmp_path, top_k=4)
    teacher = CachedTeacher(accelerator, cache, Student(), Tok())
    batch = {**batch_of(train), **teacher.inputs(train)}
    assert torch.equal(batch["cache_rows"], cache.row_indices(train))
    got = teacher.distributions(batch)
    assert torch.equal(got, cache.logits(batch["cache_rows"], batch["targets"], V))
    # At the targets, its top-4 log-probabilities are the teacher's.
    mask = batch["targets"] != IGNORE_INDEX
    exact = torch.log_softmax(TableTeacher().table[batch["input_ids"]].detach(), -1)[mask]
    top = exact.topk(4, -1)
    torch.testing.assert_close(torch.log_softmax(got[mask], -1).gather(-1, top.indices), top.values,
                               atol=2e-3, rtol=0)
    assert teacher.evaluated() is None


def test_a_cached_teacher_wider_than_the_student_is_refused(accelerator, tmp_path):
    _, _, cache = make(tmp_path, top_k=4)
    with pytest.raises(Exception, match="fewer|rows|logits"):
        CachedTeacher(accelerator, cache, Student(rows=3), Tok({f"t{i}": i for i in range(3)}))


def test_an_online_teacher_trains_its_module_with_the_student_in_one_forward(accelerator, tmp_path):
    from kdexp.models import asset_path, load_model

    model, _ = load_model({"name_or_path": asset_path("tiny-teacher"), "dtype": "float32"}, "teacher")
    student, _ = load_model({"name_or_path": asset_path("tiny-teacher"), "dtype": "float32"}, "student")
    teacher = OnlineTeacher(accelerator, None, model, OnlineModule(r=2, lora_alpha=4))
    pair = teacher.engine_module(student)
    assert isinstance(pair, Pair) and teacher.student_part == "student"
    (params, lr), = teacher.param_groups()
    assert lr == OnlineModule().lr and params and all(p.requires_grad for p in params)
    assert {id(p) for p in params} == {id(p) for p in teacher.module.parameters() if p.requires_grad}
    ids = torch.randint(3, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    s, t = teacher.forward(pair, batch, wanted=True)
    assert s.requires_grad and t.requires_grad  # both models train
    torch.testing.assert_close(t.detach(), teacher.distributions(batch))
    assert teacher.prepared(pair) is student


def test_every_teacher_source_has_a_builder_and_the_config_check_knows_it():
    from kdexp.config import TEACHER_SOURCES
    from kdexp.teachers import SOURCES

    assert sorted(SOURCES.names()) == sorted(TEACHER_SOURCES)


def test_rewards_read_the_teacher_without_the_runs_mixed_precision(accelerator):
    """GKD+RL's teacher-likelihood reward is scored in the model's own dtype, as before the
    teacher side existed; the loss's teacher logits follow the run's autocast."""
    seen = []

    class Recorder(LiveTeacher):
        def distributions(self, batch, autocast=True):
            seen.append(autocast)
            return super().distributions(batch, autocast)

    from kdexp.methods import rl

    teacher = Recorder(accelerator, None, TableTeacher())
    ctx = type("Ctx", (), {"teacher": teacher, "tokenizer": Tok(), "accelerator": accelerator})()
    rows = examples(3)
    got = rl.teacher_loglik(ctx, rows)
    batch = collate_train(rows, 0)
    logp = torch.log_softmax(TableTeacher().table[batch["input_ids"]].detach(), -1)
    mask = batch["targets"] != IGNORE_INDEX
    picked = logp.gather(-1, batch["targets"].clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    want = (picked.sum(-1) / mask.sum(-1)).tolist()
    assert seen == [False] and got == pytest.approx(want, rel=1e-5)
