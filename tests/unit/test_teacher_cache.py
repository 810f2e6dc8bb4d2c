"""The teacher-logit cache on a hand-built teacher: what is stored, how it is read back, and
every way a cache can fail to match a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdexp import losses
from kdexp.data.encode import Example, collate_train
from kdexp.errors import UserError
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.teacher_cache import MIN_LOG_REST, TeacherCache, build, bytes_per_token, open_cache, sequence_key

V = 12


class TableTeacher(torch.nn.Module):
    """Logits that depend on the current token only: row ``input_ids[t]`` of a fixed table."""

    def __init__(self, seed: int = 0, fail_after: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g) * 3)
        self.lm_head = torch.nn.Linear(1, V)  # vocab_rows() reads the output embedding
        self.calls, self.fail_after = 0, fail_after

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("the teacher died")
        return type("Out", (), {"logits": self.table[input_ids]})()


class Tok:
    pad_token_id = 0

    def __init__(self, vocab: dict | None = None):
        self.vocab = vocab or {f"t{i}": i for i in range(V)}

    def get_vocab(self):
        return dict(self.vocab)


def examples(n: int = 7, seed: int = 1) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(1, V, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(1, V, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        out.append(Example(p, r, {}))
    return out


def cfg_for(tmp_path, top_k: int):
    return OmegaConf.create({"teacher": {"name_or_path": "table", "revision": None, "dtype": "float32",
                                         "top_k": top_k, "cache": str(tmp_path / f"cache{top_k}")},
                             "data": {"name": "hand"}, "rollout": {"cache_dir": str(tmp_path)}})


def make(tmp_path, top_k: int, train=None, teacher=None, batch_size: int = 3):
    train = train or examples()
    cfg = cfg_for(tmp_path, top_k)
    build(cfg, teacher or TableTeacher(), Tok(), train, tmp_path / f"cache{top_k}", batch_size, torch.device("cpu"))
    return cfg, train, TeacherCache(tmp_path / f"cache{top_k}")


def teacher_logprobs(train):
    batch = collate_train(train, 0)
    return torch.log_softmax(TableTeacher().table[batch["input_ids"]].detach(), -1), batch


def test_full_k_rebuilds_the_teachers_distribution(tmp_path):
    """k = V: every log-probability is stored (float16), nothing is in the tail."""
    _, train, cache = make(tmp_path, V)
    logp, batch = teacher_logprobs(train)
    dense = cache.logits(cache.row_indices(train), batch["targets"], V)
    mask = batch["targets"] != IGNORE_INDEX
    torch.testing.assert_close(dense[mask], logp[mask], atol=2e-2, rtol=1e-3)  # float16 storage
    assert torch.all(dense[~mask] == 0)  # masked positions: uniform, never NaN
    fkl = losses.divergence("fkl")(logp[mask], dense[mask])  # student = the true teacher
    assert float(fkl.max()) < 1e-4


def test_top_k_keeps_the_top_values_and_the_tail_mass(tmp_path):
    k = 4
    _, train, cache = make(tmp_path, k)
    logp, batch = teacher_logprobs(train)
    mask = batch["targets"] != IGNORE_INDEX
    dense = cache.logits(cache.row_indices(train), batch["targets"], V)[mask]
    true = logp[mask]
    top = true.topk(k, -1)
    torch.testing.assert_close(dense.gather(1, top.indices), top.values, atol=2e-2, rtol=1e-3)
    # The other V - k entries share the rest of the mass evenly; the row sums to 1.
    rest = torch.log1p(-top.values.exp().sum(-1))
    others = dense.scatter(1, top.indices, float("nan"))
    expected = (rest - math.log(V - k))[:, None].expand(-1, V)
    keep = ~others.isnan()
    torch.testing.assert_close(others[keep], expected[keep], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(dense.logsumexp(-1), torch.zeros(len(dense)), atol=2e-3, rtol=0)


def test_the_files_have_the_advertised_size_and_are_memory_mapped(tmp_path):
    cfg, train, cache = make(tmp_path, 4)
    positions = sum(len(e.response_ids) for e in train)
    meta = json.loads((tmp_path / "cache4" / "meta.json").read_text())
    assert meta["positions"] == positions and meta["bytes_per_token"] == bytes_per_token(4, V) == 4 * 4 + 4
    payload = sum(np.load(tmp_path / "cache4" / f"{n}.npy", mmap_mode="r").nbytes
                  for n in ("ids", "logprobs", "log_rest"))
    assert payload == positions * meta["bytes_per_token"]
    assert all(isinstance(a, np.memmap) for a in (cache.ids, cache.logprobs, cache.log_rest))
    # The budget: <= 400 bytes per token at k = 64, also for a 152k vocabulary.
    assert bytes_per_token(64, 152064) == 388 and bytes_per_token(64, 32000) == 260


def test_rows_are_found_by_content_in_any_order(tmp_path):
    _, train, cache = make(tmp_path, 4)
    shuffled = [train[i] for i in (5, 0, 3)]
    assert cache.row_indices(shuffled).tolist() == [5, 0, 3]
    logp, _ = teacher_logprobs(train)
    batch = collate_train(shuffled, 0)
    dense = cache.logits(cache.row_indices(shuffled), batch["targets"], V)
    mask = batch["targets"] != IGNORE_INDEX
    ref, _ = teacher_logprobs(shuffled)
    assert torch.equal(dense[mask].argmax(-1), ref[mask].argmax(-1))
    student_sample = train[0].with_response([1, 2], "student")
    with pytest.raises(RuntimeError, match="not in the teacher cache"):
        cache.row_indices([student_sample])


def test_a_tail_of_zero_stays_finite(tmp_path):
    teacher = TableTeacher()
    with torch.no_grad():
        teacher.table[:, 3:] = -1e4  # all the mass on tokens 0..2
    _, train, cache = make(tmp_path, 3, teacher=teacher)
    batch = collate_train(train, 0)
    dense = cache.logits(cache.row_indices(train), batch["targets"], V)
    assert torch.isfinite(dense).all() and float(dense.min()) >= MIN_LOG_REST - math.log(V)
    for name in ("fkl", "rkl", "jsd", "tvd", "srkl"):
        assert torch.isfinite(losses.divergence(name)(torch.randn(*dense.shape), dense)).all(), name


def test_an_interrupted_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="died"):
        make(tmp_path, 4, teacher=TableTeacher(fail_after=1))
    assert list(tmp_path.iterdir()) == []


def test_open_cache_checks_the_run_against_the_cache(tmp_path):
    cfg, train, _ = make(tmp_path, 4)
    assert len(open_cache(cfg, train, Tok())) == len(train)
    with pytest.raises(UserError, match="another tokenizer"):
        open_cache(cfg, train, Tok({"x": 0}))
    other = [*train, Example([1], [2, 3], {})]
    with pytest.raises(UserError, match="lacks 1 of the 8 training sequences"):
        open_cache(cfg, other, Tok())
    cfg.teacher.top_k = 8
    with pytest.raises(UserError, match="holds top-4, but teacher.top_k=8"):
        open_cache(cfg, train, Tok())
    cfg.teacher.cache = None  # the default directory of this teacher / data / k: not built
    with pytest.raises(UserError, match="no teacher cache at .*kdexp cache-teacher"):
        open_cache(cfg, train, Tok())
    (tmp_path / "cache4" / "ids.npy").write_bytes(b"garbage")
    cfg.teacher.cache, cfg.teacher.top_k = str(tmp_path / "cache4"), 4
    with pytest.raises(UserError, match="damaged"):
        open_cache(cfg, train, Tok())


def test_keys_depend_on_the_boundary_between_prompt_and_response():
    assert sequence_key(Example([1, 2], [3], {})) != sequence_key(Example([1], [2, 3], {}))
    assert sequence_key(Example([1, 2], [3], {})) == sequence_key(Example([1, 2], [3], {"x": 1}))
