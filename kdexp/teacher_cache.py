"""The teacher-logit cache: the teacher's top-k log-probabilities on the training text, computed
once and read from disk during training, so that off-policy methods train without a live teacher.

    kdexp cache-teacher teacher=tiny data=toy teacher.top_k=64     # once per teacher, data and k
    kdexp train method=kd teacher=tiny data=toy teacher.source=cache teacher.top_k=64

What is stored, per response token of every training sequence (the positions whose targets
the loss sees): the ids of the teacher's ``k`` most likely next tokens (uint16 when the
vocabulary fits, else int32), their log-probabilities at temperature 1 (float16), and the log of
the tail's share at the loss temperature T, ``log sum_{v outside the top k} p_v^(1/T)``
(float32; at T = 1 the log of the remaining mass). At k = 64 that is 260 bytes per token for
vocabularies up to 65,536 tokens and 388 bytes above (Qwen2.5's 152k). The arrays are ``.npy``
files opened memory-mapped (``numpy.load(mmap_mode="r")``): a micro-batch reads its own rows,
and the cache is never loaded whole into memory.

During training the teacher's distribution at a position is rebuilt as dense logits whose
softmax at T is: the k stored tokens with their exact tempered probabilities, and the tail's
exact tempered mass spread evenly over the other ``V - k`` tokens (the residual-mass
approximation of sparse-logit KD; the rebuilt distribution sums to 1, and every divergence of
``loss=`` applies unchanged). It is exact on the top k and on the total mass of the tail at
the temperature it was built for; only the shape of the tail is lost, which matters little for
forward KL (the tail has little mass) and more for mode-seeking divergences at small k. The
tail's mass at T cannot be recovered from its mass at 1 (tempering a flat tail overstates it at
T > 1, understates it at T < 1), so a cache records its T and serves that T only: a run whose
objective reads the teacher at another temperature (or at two) is refused.
``benchmarks/teacher_cache.py`` measures the effect on the final metric for k = 16, 64, 256.

**Sampled targets** (``teacher.sparse=sampled teacher.samples=n``): instead of the top k, n
tokens drawn with replacement from the teacher's distribution at the loss temperature T, stored
as the distinct tokens (ids), how often each was drawn (uint8 counts) and the log-probability
at T of each (float16), in ``min(n, V)`` slots: ``n * 5`` bytes per token (uint16 ids; 60 at
n = 12). The loss is then the unbiased estimate of :mod:`kdexp.losses.sampled` (fkl, skl, tvd),
not a divergence of a rebuilt distribution. The draws are seeded per sequence (from
``teacher.sample_seed`` and the sequence's tokens), so a cache does not depend on the batch
size it was built with, and ``kdexp serve-teacher`` draws the same tokens for the same sequence
(up to floating-point differences in the teacher's logits).

Where the cache lives: ``teacher.cache`` (a directory), or by default
``${rollout.cache_dir}/teacher-logits-KEY`` with KEY a hash of the teacher (name, revision,
dtype, and for a local directory its files' sizes and times), the tokenized training sequences,
k and T, so that ``kdexp train`` finds the cache ``kdexp cache-teacher`` wrote for the same
overrides. A cache is written into a temporary directory and renamed when complete: an
interrupted ``cache-teacher`` leaves no cache behind that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from kdexp.data.encode import Example
from kdexp.errors import UserError
from kdexp.losses.fused import Sparse
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.losses.sampled import Sampled, draw_sequence

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the tail at the recorded temperature (1: at T = 1 only)
ARRAYS = {"topk": ("ids", "logprobs", "log_rest", "offsets", "keys"),  # by teacher.sparse
          "sampled": ("ids", "counts", "logprobs", "offsets", "keys")}
MAX_SAMPLES = 255  # counts are uint8
# The log of the tail mass never goes below this (a tail of exactly 0, or k >= V): e^-69 ~ 1e-30,
# finite in every divergence, and nothing next to the top k.
MIN_LOG_REST = -69.0


def sequence_key(example: Example) -> int:
    """A 63-bit key of a training sequence's token ids (prompt and response, and the boundary)."""
    blob = json.dumps([example.prompt_ids, example.response_ids]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def bytes_per_token(top_k: int, vocab: int, sparse: str = "topk") -> int:
    """One position's bytes: top-k ids, float16 log-probabilities and the float32 tail; or
    (``sampled``, ``top_k`` the number of draws) ids, uint8 counts and float16 log-probabilities
    of ``min(n, V)`` slots."""
    if sparse == "sampled":
        return min(top_k, vocab) * (_id_dtype(vocab).itemsize + 1 + 2)
    return top_k * (_id_dtype(vocab).itemsize + 2) + 4


def _id_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.int32)


def temperature_of(temperatures: set[float]) -> float:
    """The one temperature a cache serves: the objective's (1 when it reads no teacher)."""
    if len(temperatures) > 1:
        listed = ", ".join(f"{t:g}" for t in sorted(temperatures))
        raise UserError(f"the objective reads the teacher at temperatures {listed}, but a teacher cache is "
                        f"exact at one temperature: use one temperature for every term, or teacher.source=live")
    return float(next(iter(temperatures), 1.0))


def default_dir(cfg: DictConfig, train: Sequence[Example], temperature: float) -> Path:
    """``${rollout.cache_dir}/teacher-logits-KEY``: the teacher, the sequences, k and T."""
    teacher = cfg.teacher
    weights: list[Any] = []
    root = Path(str(teacher.name_or_path))
    if root.is_dir():  # a local directory: its files' sizes and times stand for its weights
        weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in root.iterdir() if p.is_file())
    sequences = hashlib.sha256(json.dumps([sequence_key(e) for e in train]).encode()).hexdigest()
    sparse, size = check_sparse(cfg)
    # a top-k cache keeps the key it always had; a sampled one names its draws
    what = ({"top_k": size} if sparse == "topk" else
            {"sparse": sparse, "samples": size, "sample_seed": int(teacher.get("sample_seed", 0))})
    blob = json.dumps({"teacher": str(teacher.name_or_path), "revision": teacher.revision, "dtype": teacher.dtype,
                       "weights": weights, "sequences": sequences, **what,
                       "temperature": float(temperature)}, sort_keys=True)
    return Path(str(cfg.rollout.cache_dir)) / f"teacher-logits-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cache_dir(cfg: DictConfig, train: Sequence[Example], temperature: float) -> Path:
    if cfg.teacher.get("cache"):
        return Path(str(cfg.teacher.cache)).expanduser()
    return default_dir(cfg, train, temperature)


def check_top_k(cfg: DictConfig) -> int:
    k = cfg.teacher.get("top_k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"teacher.top_k must be a positive integer, got {k!r}")
    return k


def check_sparse(cfg: DictConfig) -> tuple[str, int]:
    """``("topk", teacher.top_k)`` or ``("sampled", teacher.samples)``: what a cache stores."""
    sparse = cfg.teacher.get("sparse", "topk")
    if sparse not in ARRAYS:
        raise UserError(f"teacher.sparse must be topk or sampled, got {sparse!r}")
    if sparse == "topk":
        return sparse, check_top_k(cfg)
    n = cfg.teacher.get("samples")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SAMPLES:
        raise UserError(f"teacher.samples must be an integer from 1 to {MAX_SAMPLES} (draws per position), got {n!r}")
    return sparse, n


def describe(sparse: str, size: int) -> str:
    return f"top-{size}" if sparse == "topk" else f"{size} draws"


def overrides(sparse: str, size: int) -> str:
    return f"teacher.top_k={size}" if sparse == "topk" else f"teacher.sparse=sampled teacher.samples={size}"


class TeacherCache:
    """A cache directory opened for reading: rows are read per micro-batch, memory-mapped."""

    def __init__(self, path: Path):
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise UserError(f"{path} is not a teacher cache (no meta.json); build one with kdexp cache-teacher")
        self.path, self.meta = path, json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{path} has cache format {self.meta.get('format')}, this kdexp reads {FORMAT}; "
                            f"rebuild it with kdexp cache-teacher")
        self.kind = str(self.meta.get("sparse", "topk"))
        if self.kind not in ARRAYS:
            raise UserError(f"{path} holds teacher targets of an unknown kind {self.kind!r}; rebuild it with "
                            f"kdexp cache-teacher")
        arrays = {}
        for name in ARRAYS[self.kind]:
            try:
                arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise UserError(f"the teacher cache {path} is damaged ({name}.npy: {err}); "
                                f"delete it and run kdexp cache-teacher again") from None
        self.ids, self.logprobs = arrays["ids"], arrays["logprobs"]
        self.log_rest, self.counts = arrays.get("log_rest"), arrays.get("counts")
        self.offsets = np.asarray(arrays["offsets"])  # one int64 per sequence: small
        self.rows = {int(k): i for i, k in enumerate(arrays["keys"])}
        self.vocab = int(self.meta["vocab"])
        self.top_k = int(self.meta.get("top_k", 0))  # a top-k cache's k (0: a sampled cache)
        self.size = self.top_k if self.kind == "topk" else int(self.meta["samples"])  # k, or the draws
        self.temperature = float(self.meta["temperature"])

    def __len__(self) -> int:
        return len(self.rows)

    def check(self, train: Sequence[Example], tokenizer) -> None:
        """Fail before training if the cache does not belong to this tokenizer and data."""
        if self.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise UserError(f"the teacher cache {self.path} was built with another tokenizer "
                            f"({self.meta['teacher']}); token-level KD needs the student's vocabulary")
        missing = sum(sequence_key(e) not in self.rows for e in train)
        if missing:
            raise UserError(f"the teacher cache {self.path} lacks {missing} of the {len(train)} training "
                            f"sequences (built for other data or length limits); rebuild it with "
                            f"kdexp cache-teacher and the same data overrides")

    def row_indices(self, examples: Sequence[Example]) -> torch.Tensor:
        """The cache's index of each example ([B] long); an example not in the cache is an error."""
        try:
            return torch.tensor([self.rows[sequence_key(e)] for e in examples], dtype=torch.long)
        except KeyError:
            origins = sorted({e.origin for e in examples})
            raise RuntimeError(f"a training sequence is not in the teacher cache {self.path} (origins "
                               f"{origins}); the cache holds the dataset's sequences only") from None

    def logits(self, rows: torch.Tensor, targets: torch.Tensor, width: int) -> torch.Tensor:
        """Dense teacher logits [B, T, width] (float32) for the examples ``rows`` of a batch with
        ``targets`` [B, T]: at every response position, logits whose softmax at the cache's
        temperature is the cached distribution (0, uniform, masked by the loss anyway,
        elsewhere). At T = 1 they are its log-probabilities."""
        return self.sparse(rows, targets, width).logits()

    def _read(self, rows: torch.Tensor, targets: torch.Tensor, *arrays: np.ndarray) -> list[torch.Tensor]:
        """The rows of ``arrays`` for the response positions of the examples ``rows``."""
        mask = targets != IGNORE_INDEX
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows.tolist()]
        for b, (start, end) in enumerate(spans):
            if end - start != int(mask[b].sum()):
                raise RuntimeError(f"the teacher cache holds {end - start} positions for a sequence with "
                                   f"{int(mask[b].sum())} response tokens; the cache is damaged")
        return [torch.from_numpy(np.concatenate([a[s:e] for s, e in spans])) for a in arrays]

    def sampled(self, rows: torch.Tensor, targets: torch.Tensor) -> Sampled:
        """A sampled cache's draws at the response positions (in position order): ids, each
        one's share of the draws, and the teacher's log-probability at the cache's T."""
        ids, counts, log_p = self._read(rows, targets, self.ids, self.counts, self.logprobs)
        device = targets.device
        return Sampled(ids.long().to(device), (counts.float() / self.size).to(device), log_p.float().to(device),
                       targets != IGNORE_INDEX)

    def sparse(self, rows: torch.Tensor, targets: torch.Tensor, width: int) -> Sparse:
        """The same teacher at the response positions only, as top-k ids and logits and the
        logit of every other entry, densified a chunk at a time by the fused path."""
        mask = targets != IGNORE_INDEX
        ids, values, rest = self._read(rows, targets, self.ids, self.logprobs, self.log_rest)
        ids, values, rest = ids.long(), values.float(), rest.float()
        # Top-k logits are the log-probabilities at 1, log p_v: divided by T they are log p_v^(1/T).
        # The tail's share sum p^(1/T), spread over the tokens outside the top k (none when
        # k >= width), is log(share / (V - k)) per token at T, that is T times it as a logit.
        # Ids past ``width`` (the teacher's padded embedding rows, never tokens) are dropped, as
        # the live path slices them off.
        spread = tail_logit(rest, width, self.top_k) * self.temperature
        device = targets.device
        return Sparse(ids.to(device), values.to(device), spread.to(device), width, mask)


def tail_logit(log_rest: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """``log(rest / (V - k))``: each tail token's share of the tail's mass ``rest`` (its log,
    ``log_rest``) spread evenly over the ``width - k`` tokens outside the top k (none: k >= V)."""
    return (log_rest - math.log(max(1, width - k))).clamp_min(MIN_LOG_REST)


def open_cache(cfg: DictConfig, train: Sequence[Example], tokenizer, temperature: float) -> TeacherCache:
    """The cache ``teacher.source=cache`` trains from, checked against this run's data and the
    temperature its objective reads the teacher at."""
    sparse, size = check_sparse(cfg)
    path = cache_dir(cfg, train, temperature)
    if not (path / "meta.json").is_file():
        raise UserError(f"no teacher cache at {path} ({describe(sparse, size)}, temperature {temperature:g}): "
                        f"build it first with the same teacher, data, method and loss overrides: kdexp "
                        f"cache-teacher teacher=... data=... loss.temperature={temperature:g} "
                        f"{overrides(sparse, size)}")
    cache = TeacherCache(path)
    if (cache.kind, cache.size) != (sparse, size):
        raise UserError(f"the teacher cache {path} holds {describe(cache.kind, cache.size)}, but the run asks for "
                        f"{describe(sparse, size)}; set {overrides(cache.kind, cache.size)} or build another cache")
    seed = int(cfg.teacher.get("sample_seed", 0))
    if sparse == "sampled" and int(cache.meta.get("sample_seed", 0)) != seed:
        raise UserError(f"the teacher cache {path} holds the draws of teacher.sample_seed={cache.meta['sample_seed']}, "
                        f"but the run asks for {seed}; set teacher.sample_seed={cache.meta['sample_seed']} or build "
                        f"another cache")
    if cache.temperature != temperature:
        raise UserError(f"the teacher cache {path} is exact at temperature {cache.temperature:g}, but the loss "
                        f"reads the teacher at {temperature:g}; build a cache for it (kdexp cache-teacher "
                        f"loss.temperature={temperature:g} ...) or set loss.temperature={cache.temperature:g}")
    cache.check(train, tokenizer)
    log.info("teacher: %s of %d training sequences (%d distinct: duplicates share one "
             "entry) at temperature %g from the cache %s (%d bytes/token)", describe(cache.kind, cache.size),
             len(cache.offsets) - 1,
             len(cache), cache.temperature, path, cache.meta["bytes_per_token"])
    return cache


@torch.inference_mode()
def top_k_rows(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], k: int, temperature: float = 1.0,
               width: int | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids and log-probabilities (at temperature 1), and the log of the tail's
    share at ``temperature``, ``log sum_tail p^(1/T)``, at the response positions of ``batch``
    (in batch order, position order): [N, k], [N, k], [N]. The top k is the same at every T.
    ``width``: the distribution over the first ``width`` logits only (the tokenizer's tokens,
    without padded embedding rows), as the live teacher is read."""
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = logits[batch["targets"] != IGNORE_INDEX][:, :width]  # [N, V], model dtype
    ids, values, rest = [], [], []
    for i in range(0, rows.shape[0], chunk):  # float32 log-softmax of `chunk` rows at a time
        logp = torch.log_softmax(rows[i:i + chunk].float(), dim=-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tail = (logp / temperature).scatter(1, top.indices, float("-inf")).logsumexp(dim=-1)
        ids.append(top.indices)
        values.append(top.values)
        rest.append(tail.clamp_min(MIN_LOG_REST))
    return torch.cat(ids), torch.cat(values), torch.cat(rest)


@torch.inference_mode()
def sampled_rows(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], n: int, temperature: float,
                 sequences: Sequence[Sequence[int]], seed: int, width: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n draws from the teacher's distribution at ``temperature`` at the response positions of
    ``batch`` (in batch order, position order): the distinct tokens, their counts and their
    log-probabilities at T, [N, S] each. Each sequence (``sequences[b]``, its prompt and response
    tokens) is drawn whole, prompt included, and its response's rows kept
    (:func:`kdexp.losses.sampled.draw_sequence`, as ``kdexp serve-teacher`` draws): the same draws
    whatever the batch or the way they are served, up to floating-point differences in the
    teacher's logits (which can move a draw across a boundary)."""
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = (batch["targets"] != IGNORE_INDEX).cpu()
    ids, counts, values = [], [], []
    for b, tokens in enumerate(sequences):
        drawn = draw_sequence(logits[b, :, :width], tokens, n, temperature, seed)
        keep = mask[b, :len(tokens) - 1]
        for out, rows in zip((ids, counts, values), drawn, strict=True):
            out.append(rows[keep])
    return torch.cat(ids), torch.cat(counts), torch.cat(values)


def build(cfg: DictConfig, teacher: torch.nn.Module, tokenizer, train: Sequence[Example], path: Path,
          batch_size: int, device: torch.device, temperature: float = 1.0) -> dict[str, Any]:
    """Write the cache of ``train`` at ``temperature`` into ``path`` (via a temporary
    directory); its meta."""
    from kdexp.data.encode import collate_train
    from kdexp.models import vocab_rows

    sparse, size = check_sparse(cfg)
    vocab = min(vocab_rows(teacher), len(tokenizer))  # padded embedding rows are not tokens
    slots = min(size, vocab)
    seed = int(cfg.teacher.get("sample_seed", 0))
    lengths = np.array([len(e.response_ids) for e in train], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shapes = {"ids": (_id_dtype(vocab), (n, slots)), "logprobs": (np.float16, (n, slots)),
                  **({"log_rest": (np.float32, (n,))} if sparse == "topk" else {"counts": (np.uint8, (n, slots))})}
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, shape)
                  for name, (dtype, shape) in shapes.items()}
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "keys.npy", np.array([sequence_key(e) for e in train], dtype=np.int64))
        started = time.time()
        for start in tqdm(range(0, len(train), batch_size), desc="teacher cache", unit="batch", leave=False):
            chunk = train[start:start + batch_size]
            batch = {key: v.to(device) for key, v in collate_train(chunk, tokenizer.pad_token_id).items()}
            if sparse == "topk":
                got = dict(zip(("ids", "logprobs", "log_rest"), top_k_rows(teacher, batch, slots, temperature, vocab),
                               strict=True))
            else:
                sequences = [e.prompt_ids + e.response_ids for e in chunk]
                got = dict(zip(("ids", "counts", "logprobs"),
                               sampled_rows(teacher, batch, size, temperature, sequences, seed, vocab), strict=True))
            lo, hi = int(offsets[start]), int(offsets[start + len(chunk)])
            for name, values in got.items():
                arrays[name][lo:hi] = values.cpu().numpy()
        for array in arrays.values():
            array.flush()
        del arrays
        what = ({"top_k": slots} if sparse == "topk" else
                {"sparse": sparse, "samples": size, "slots": slots, "sample_seed": seed})
        meta = {"format": FORMAT, "teacher": str(cfg.teacher.name_or_path), "revision": cfg.teacher.revision,
                "dtype": str(cfg.teacher.dtype), "data": str(cfg.data.name), **what, "vocab": vocab,
                "temperature": float(temperature),
                "tokenizer": tokenizer_fingerprint(tokenizer), "sequences": len(train), "positions": n,
                "bytes_per_token": bytes_per_token(slots, vocab, sparse), "seconds": round(time.time() - started, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)  # atomic: a reader sees the whole cache or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def run_cache(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``kdexp cache-teacher``: the teacher's top-k log-probabilities on the training split."""
    from kdexp import config
    from kdexp.data import load_examples
    from kdexp.models import load_model, load_tokenizer

    issues = config.problems(cfg, keys=["teacher", "data", "rollout"])
    if issues:
        raise UserError("; ".join(issues))
    if not cfg.teacher.name_or_path:
        raise UserError("which teacher? kdexp cache-teacher teacher=NAME (teacher=none has nothing to cache)")
    sparse, size = check_sparse(cfg)
    from kdexp.methods import build_objective

    temperature = temperature_of(build_objective(cfg).teacher_temperatures)
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    train = load_examples(cfg.data, tokenizer, splits=["train"])["train"]
    path = cache_dir(cfg, train, temperature)
    if (path / "meta.json").is_file() and not cfg.teacher.get("rebuild_cache"):
        meta = json.loads((path / "meta.json").read_text())
        log.info("the teacher cache %s exists (%s, %s positions); teacher.rebuild_cache=true rebuilds it",
                 path, describe(sparse, size), meta.get("positions"))
        print(path)
        return meta
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    teacher, _ = load_model(cfg.teacher, "teacher", tokenizer)
    teacher.requires_grad_(False).eval().to(device)
    log.info("caching the teacher's %s on %d sequences at temperature %g into %s",
             describe(sparse, size), len(train), temperature, path)
    meta = build(cfg, teacher, tokenizer, train, path, int(cfg.train.micro_batch_size), device, temperature)
    (run_dir / "cache.json").write_text(json.dumps({"path": str(path), **meta}, indent=2) + "\n")
    log.info("teacher cache: %d positions x %s, %d bytes/token, %.1f MB, %.1f s", meta["positions"],
             describe(sparse, size), meta["bytes_per_token"], meta["positions"] * meta["bytes_per_token"] / 1e6,
             meta["seconds"])
    print(path)
    return meta
