"""Online KD: teacher-side terms, one backward for two models, the pair's checkpoints."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdexp.errors import UserError
from kdexp.losses.objective import IGNORE_INDEX, Objective, cross_entropy
from kdexp.methods.online import OnlineModule, Pair
from kdexp.models import asset_path, load_model

V, B, T = 9, 3, 5


def _models(seed=0):
    """Two tiny "models": embedding + linear head, logits [B, T, V] from token ids."""
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Embedding(V, 6), torch.nn.Linear(6, V)) for _ in range(2)]


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = IGNORE_INDEX
    return ids, {"targets": y}


def _fkl(s, t):
    """KL(p_t || q_s) per position, written independently of kdexp."""
    p = torch.softmax(t, -1)
    return (p * (p.log() - torch.log_softmax(s, -1))).sum(-1)


OKD = [{"loss": "fkl", "weight": 1.0}, {"loss": "fkl", "weight": 0.3, "trains": "teacher"},
       {"loss": "ce", "weight": 0.7, "trains": "teacher"}]


def test_one_backward_gives_each_model_the_gradient_of_its_own_loss():
    """L_s + L_t in one backward == L_s backward for the student and L_t for the teacher."""
    ids, batch = _batch()
    n = int((batch["targets"] != IGNORE_INDEX).sum())
    student, teacher = _models()
    loss, parts = Objective.from_spec(OKD)(student(ids), teacher(ids), batch, n)
    loss.backward()
    together = [p.grad.clone() for m in (student, teacher) for p in m.parameters()]
    assert set(parts) == {"fkl", "teacher_fkl", "teacher_ce"}

    student2, teacher2 = _models()
    mask = batch["targets"] != IGNORE_INDEX
    s, t = student2(ids), teacher2(ids)
    (torch.where(mask, _fkl(s, t.detach()), 0).sum() / n).backward()            # L_s
    l_t = torch.where(mask, 0.3 * _fkl(s.detach(), t) + 0.7 * cross_entropy(t, batch["targets"]), 0).sum() / n
    l_t.backward()                                                                # L_t
    apart = [p.grad for m in (student2, teacher2) for p in m.parameters()]
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("spec", "moved"), [
    ([OKD[0]], "student"),      # the student's divergence never reaches the teacher
    (OKD[1:], "teacher"),       # nor the teacher's losses the student
])
def test_gradients_do_not_cross_sides(spec, moved):
    ids, batch = _batch()
    student, teacher = _models()
    loss, _ = Objective.from_spec(spec)(student(ids), teacher(ids), batch, 10)
    loss.backward()
    for name, model in (("student", student), ("teacher", teacher)):
        grads = [p.grad for p in model.parameters()]
        if name == moved:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_teacher_terms_are_checked():
    with pytest.raises(UserError, match="trains must be student or teacher"):
        Objective.from_spec([{"loss": "fkl", "trains": "both"}])
    with pytest.raises(UserError, match="cannot train the teacher"):
        Objective.from_spec([{"loss": "minillm_pg", "trains": "teacher"}])
    with pytest.raises(UserError, match="adaptive scales the student"):
        Objective.from_spec([{"loss": "ce"}, {"loss": "fkl", "trains": "teacher", "adaptive": True}])
    assert Objective.from_spec(OKD).trains_teacher and not Objective.from_spec(OKD[:1]).trains_teacher


def test_alpha_zero_trains_the_module_on_the_references_only():
    from kdexp import methods

    cfg = OmegaConf.create({"method": {"name": "okd", "alpha": 0.0}, "loss": {"name": "fkl", "temperature": 1.0}})
    objective = Objective.from_spec(methods.okd_terms(cfg))
    assert [(t.name, t.trains, t.weight) for t in objective.terms] == [
        ("fkl", "student", 1.0), ("teacher_ce", "teacher", 1.0)]


@pytest.fixture(scope="module")
def tiny_teacher():
    spec = {"name_or_path": asset_path("tiny-teacher"), "init": "pretrained", "dtype": "float32"}
    return lambda: load_model(spec, "teacher")[0]


@pytest.mark.parametrize("kind", ["lora", "prefix", "ptuning"])
def test_attached_module_is_the_only_trainable_part_and_logits_align(tiny_teacher, kind):
    teacher = tiny_teacher()
    ids = torch.randint(3, 50, (2, 7))
    mask = torch.ones_like(ids)
    base = teacher(input_ids=ids, attention_mask=mask).logits.detach()
    module = OnlineModule(kind=kind, r=4, lora_alpha=8, num_virtual_tokens=3)
    adapted = module.attach(teacher)
    marker = "lora_" if kind == "lora" else "prompt_encoder"
    params = dict(adapted.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if marker in n} and trainable
    pair = Pair(torch.nn.Identity(), adapted, module.virtual_tokens)
    logits = pair.teacher(input_ids=ids, attention_mask=mask).logits[:, pair.virtual_tokens:]
    assert logits.shape == base.shape
    if kind == "lora":  # B starts at zero: the adapted teacher starts as the teacher
        torch.testing.assert_close(logits, base)


def test_pair_checkpoints_leave_the_frozen_teacher_out(tiny_teacher):
    student, _ = _models()
    adapted = OnlineModule(r=4, lora_alpha=8).attach(tiny_teacher())
    pair = Pair(student, adapted)
    state = pair.state_dict()
    teacher_keys = [k for k in state if k.startswith("teacher.")]
    assert teacher_keys and all("lora_" in k for k in teacher_keys)
    assert any(k.startswith("student.") for k in state)
    for k in teacher_keys:  # a changed adapter is restored by a strict load
        state[k] = state[k] + 1.0
    fresh = Pair(_models()[0], OnlineModule(r=4, lora_alpha=8).attach(tiny_teacher()))
    fresh.load_state_dict(state)  # strict: only the frozen teacher weights may be missing
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("student.")})
