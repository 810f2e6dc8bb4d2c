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
from kdexp.teacher_cache import (
    MIN_LOG_REST,
    TeacherCache,
    build,
    bytes_per_token,
    open_cache,
    sequence_key,
    temperature_of,
    top_k_rows,
)

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

    def __len__(self):
        return len(self.vocab)


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


def make(tmp_path, top_k: int, train=None, teacher=None, batch_size: int = 3, temperature: float = 1.0):
    train = train or examples()
    cfg = cfg_for(tmp_path, top_k)
    build(cfg, teacher or TableTeacher(), Tok(), train, tmp_path / f"cache{top_k}", batch_size, torch.device("cpu"),
          temperature)
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
    assert len(open_cache(cfg, train, Tok(), 1.0)) == len(train)
    with pytest.raises(UserError, match="another tokenizer"):
        open_cache(cfg, train, Tok({"x": 0}), 1.0)
    other = [*train, Example([1], [2, 3], {})]
    with pytest.raises(UserError, match="lacks 1 of the 8 training sequences"):
        open_cache(cfg, other, Tok(), 1.0)
    cfg.teacher.top_k = 8
    with pytest.raises(UserError, match="holds top-4, but the run asks for top-8; set teacher.top_k=4"):
        open_cache(cfg, train, Tok(), 1.0)
    cfg.teacher.cache = None  # the default directory of this teacher / data / k: not built
    with pytest.raises(UserError, match="no teacher cache at .*kdexp cache-teacher"):
        open_cache(cfg, train, Tok(), 1.0)
    cfg.teacher.cache = str(tmp_path / "cache4")  # built at T = 1, read at T = 2
    cfg.teacher.top_k = 4
    with pytest.raises(UserError, match="exact at temperature 1, but the loss reads the teacher at 2"):
        open_cache(cfg, train, Tok(), 2.0)
    (tmp_path / "cache4" / "ids.npy").write_bytes(b"garbage")
    cfg.teacher.cache, cfg.teacher.top_k = str(tmp_path / "cache4"), 4
    with pytest.raises(UserError, match="damaged"):
        open_cache(cfg, train, Tok(), 1.0)


def test_keys_depend_on_the_boundary_between_prompt_and_response():
    assert sequence_key(Example([1, 2], [3], {})) != sequence_key(Example([1], [2, 3], {}))
    assert sequence_key(Example([1, 2], [3], {})) == sequence_key(Example([1, 2], [3], {"x": 1}))


class ZipfTeacher(torch.nn.Module):
    """One position's logits: a Zipf distribution over V tokens, p_v proportional to (v + 1)^-2."""

    def __init__(self, vocab: int):
        super().__init__()
        self.logits = -2 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
        self.lm_head = torch.nn.Linear(1, vocab)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits.expand(*input_ids.shape, -1)})()


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_a_cache_at_the_loss_temperature_rebuilds_the_tempered_distribution(tmp_path, temperature):
    """Zipf teacher, V = 32000, k = 64: the tempered tail mass and top-k probabilities of the
    rebuilt logits are the true tempered ones. (Tempering the mass stored at T = 1, spread
    flat, gives 0.824 instead of 0.567 at T = 2, and 6.9e-9 instead of 1.1e-6 at T = 0.5.)"""
    vocab, k = 32000, 64
    teacher = ZipfTeacher(vocab)
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2),
             "targets": torch.tensor([[5, IGNORE_INDEX]])}
    ids, values, rest = top_k_rows(teacher, batch, k, temperature)
    true = torch.log_softmax(teacher.logits.double() / temperature, -1)  # [V]
    true_tail = 1 - true[:k].exp().sum()
    cache_path = tmp_path / "zipf"
    cache_path.mkdir()
    cache = object.__new__(TeacherCache)  # the rebuild alone, on these rows
    cache.top_k, cache.vocab, cache.temperature = k, vocab, temperature
    cache.ids, cache.logprobs, cache.log_rest = ids.numpy(), values.half().numpy(), rest.numpy()
    cache.offsets = np.array([0, 1])
    dense = cache.logits(torch.tensor([0]), batch["targets"], vocab)[0, 0]
    rebuilt = torch.log_softmax(dense.double() / temperature, -1)
    assert (1 - rebuilt[:k].exp().sum()).item() == pytest.approx(true_tail.item(), rel=5e-3)  # float16 top k
    torch.testing.assert_close(rebuilt[:k].exp(), true[:k].exp(), rtol=5e-3, atol=1e-6)
    # What tempering the flat tail stored at T = 1 gives: far off.
    log_p = torch.log_softmax(teacher.logits.double(), -1)
    flat = torch.cat([log_p[:k], (torch.log1p(-log_p[:k].exp().sum()) - math.log(vocab - k)).expand(vocab - k)])
    flat_tail = 1 - torch.log_softmax(flat / temperature, -1)[:k].exp().sum()
    assert abs(flat_tail.item() - true_tail.item()) > 0.3 * true_tail.item()


def test_the_temperature_of_a_cache_is_the_objectives():
    from kdexp.losses.objective import Objective

    kd = Objective.from_spec([{"loss": "ce", "weight": 0.5}, {"loss": "fkl", "weight": 0.5, "temperature": 2.0}])
    assert temperature_of(kd.teacher_temperatures) == 2.0
    assert temperature_of(Objective.from_spec([{"loss": "ce"}]).teacher_temperatures) == 1.0
    weighted = Objective.from_spec([{"loss": "fkl", "temperature": 2.0}], sample_weight="teacher_likelihood")
    with pytest.raises(UserError, match="temperatures 1, 2"):
        temperature_of(weighted.teacher_temperatures)


def test_the_cache_key_holds_the_temperature(tmp_path):
    from kdexp.teacher_cache import default_dir

    cfg = cfg_for(tmp_path, 4)
    assert default_dir(cfg, examples(), 1.0) != default_dir(cfg, examples(), 2.0)
    _, train, cache = make(tmp_path, 4, temperature=2.0)
    assert cache.temperature == 2.0
    assert json.loads((tmp_path / "cache4" / "meta.json").read_text())["temperature"] == 2.0


def test_padded_logit_rows_are_not_cached(tmp_path):
    """A teacher with 4 padded embedding rows (with mass of their own) beyond the tokenizer's V
    tokens: the cache holds its distribution over the V tokens, as the live teacher is read."""
    teacher = TableTeacher()
    with torch.no_grad():
        padded = torch.cat([teacher.table, torch.full((V, 4), 3.0)], dim=1)
    teacher.table = torch.nn.Parameter(padded)
    teacher.lm_head = torch.nn.Linear(1, V + 4)
    _, train, cache = make(tmp_path, V, teacher=teacher)
    assert cache.vocab == V
    logp, batch = teacher_logprobs(train)  # over the V tokens of the unpadded table
    dense = cache.logits(cache.row_indices(train), batch["targets"], V)
    mask = batch["targets"] != IGNORE_INDEX
    torch.testing.assert_close(dense[mask], logp[mask], atol=2e-2, rtol=1e-3)
