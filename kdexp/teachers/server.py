"""A teacher served by an inference server (``teacher.source=server``): vLLM, or ``kdexp serve-teacher``.

    vllm serve Qwen/Qwen2.5-7B-Instruct --max-logprobs 64 --api-key "$KDEXP_TEACHER_API_KEY"
    kdexp serve-teacher teacher=tiny serve.port=8000                  # the same protocol, any HF model
    kdexp train method=kd teacher.source=server teacher.url=http://127.0.0.1:8000 teacher.top_k=64

The client speaks the subset of vLLM's OpenAI-compatible completions API that scores text:
``POST /v1/completions`` with token-id prompts, ``max_tokens: 1`` and ``prompt_logprobs: K``.
vLLM answers, per prompt, ``prompt_logprobs``: one entry per prompt token, ``null`` for the
first and, for token ``i``, a dict ``{token id: {logprob, rank, decoded_token}}`` with the K
most likely tokens given tokens ``< i`` (ranks 1..K) and token ``i`` itself (its own rank).
The distribution at a response position is those top K log-probabilities (at temperature 1, as
the server computes them) and the remaining mass ``1 - sum(top K)`` spread evenly over the
other ``V - K`` tokens: the cache's top-k-plus-tail layout (:class:`kdexp.losses.fused.Sparse`),
so every divergence applies. At T = 1 it is what ``kdexp cache-teacher`` stores for the same K
(up to the cache's float16 rounding). The server gives the tail's mass at T = 1 only, so at a
loss temperature T != 1 the tail is tempered as if flat (each tail token ``(rest / (V - K))``
before tempering); a cache built at T keeps the tail's exact tempered mass.

Checks: at start-up the server must be reachable, accept the API key, and tokenize a probe text
(ASCII, multi-byte characters, digits, whitespace) to the student's token ids and decode the
student's last token id to the same text; a response must cover every requested position and
name the actual token at each, else the run stops with one line. Connection failures, timeouts,
429 and 5xx answers are retried with exponential backoff (``teacher.retries``); a wrong or
missing key (401/403) is not retried. The key is read from the environment variable named by
``teacher.api_key_env`` and never written to the config, the logs or an error message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kdexp.errors import UserError
from kdexp.losses.fused import Sparse
from kdexp.losses.objective import IGNORE_INDEX
from kdexp.teacher_cache import MIN_LOG_REST  # the tail's floor, as the cache's
from kdexp.teachers.base import Logits, Teacher

log = logging.getLogger(__name__)

PROBE = "kdexp probe: Hello, wörld! naïve café 東京 ✓ 12345\n\tend."
RETRY_STATUS = {429, 500, 502, 503, 504}


class TeacherUnavailable(UserError):
    """The server stayed unreachable through every retry."""


class ServerClient:
    """HTTP calls to a teacher server, with retries; ``api_key`` is sent, never shown."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5, key_env: str = "KDEXP_TEACHER_API_KEY"):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self._key, self.key_env = api_key, key_env
        self.model = ""  # the served model's name, from GET /v1/models

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(path, json.dumps(body).encode())

    def get(self, path: str) -> dict[str, Any]:
        return self._call(path, None)

    def _call(self, path: str, data: bytes | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                             method="POST" if data is not None else "GET")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code in (401, 403):
                    raise UserError(f"the teacher server at {self.url} refused the API key (HTTP {err.code}): "
                                    f"set ${self.key_env} to the key it was started with") from None
                if err.code not in RETRY_STATUS:
                    raise UserError(f"the teacher server at {self.url} answered {path} with HTTP {err.code}: "
                                    f"{message}") from None
                why = f"HTTP {err.code} {message}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                reason = getattr(err, "reason", err)
                why = "timed out" if isinstance(reason, TimeoutError) else str(reason)
            except json.JSONDecodeError:
                raise UserError(f"the teacher server at {self.url} answered {path} with something that is "
                                f"not JSON: is teacher.url an OpenAI-compatible server?") from None
            if attempt < self.retries:
                log.warning("teacher server %s%s: %s; retrying (%d/%d)", self.url, path, why, attempt + 1,
                            self.retries)
        raise TeacherUnavailable(f"the teacher server at {self.url} is unreachable ({why}) after "
                                 f"{self.retries + 1} tries; start it, or check teacher.url")


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        return err.reason or ""
    inner = body.get("error", body)
    return str(inner.get("message", inner) if isinstance(inner, dict) else inner)[:300]


def parse_prompt_logprobs(entries: list, ids: Sequence[int], positions: Sequence[int], k: int,
                          ) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """The top-k ids and log-probabilities and the log of the remaining mass at ``positions``
    (token indices into ``ids``) of one prompt's vLLM ``prompt_logprobs``. A response that does
    not cover a position, lacks the actual token there, or has fewer than k ranked entries is an
    error: never a silently wrong distribution."""
    if len(entries) != len(ids):
        raise UserError(f"the teacher server returned log-probabilities for {len(entries)} positions of a "
                        f"{len(ids)}-token sequence")
    top_ids, top_values, rest = [], [], []
    for p in positions:
        entry = entries[p]
        if not entry or str(ids[p]) not in entry:
            raise UserError(f"the teacher server's log-probabilities at position {p} do not cover the "
                            f"sequence's token {ids[p]}: is it serving the same tokenizer?")
        ranked = sorted(((int(v["rank"]), int(t), float(v["logprob"])) for t, v in entry.items()
                         if v.get("rank") is not None and int(v["rank"]) <= k), key=lambda x: x[0])
        if len(ranked) < k:
            raise UserError(f"the teacher server returned {len(ranked)} ranked log-probabilities at a "
                            f"position, teacher.top_k={k} asks for {k}: start it with --max-logprobs >= {k}")
        ranked = ranked[:k]
        top_ids.append([t for _, t, _ in ranked])
        top_values.append([lp for _, _, lp in ranked])
        mass = math.fsum(math.exp(lp) for _, _, lp in ranked)
        rest.append(max(MIN_LOG_REST, math.log(1.0 - mass)) if mass < 1.0 else MIN_LOG_REST)
    return top_ids, top_values, rest


class ServerTeacher(Teacher):
    """The teacher's top-k log-probabilities at every response token, asked of a server per
    micro-batch (``inputs``), and given to the loss as a top-k-plus-tail distribution."""

    kind = "server"

    def __init__(self, accelerator, client: ServerClient, top_k: int, student: torch.nn.Module, tokenizer,
                 concurrency: int = 1):
        from kdexp.models import logit_width, vocab_rows

        rows = vocab_rows(student)
        vocab = logit_width(rows, rows, len(tokenizer), "served teacher")  # the tokenizer's tokens only
        super().__init__(accelerator, vocab)
        self.client, self.top_k, self.width = client, top_k, vocab or rows
        self.model_name, self.concurrency = client.model, max(1, concurrency)
        if self.width < top_k:
            raise UserError(f"teacher.top_k={top_k} is more than the student's {self.width} logits")

    def score(self, sequences: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, ...]:
        """``(ids [N, k], logprobs [N, k], log_rest [N])`` at the tokens ``starts[i]:`` of each
        sequence (its response), in sequence order: what the loss's targets are."""
        parts = [list(range(i, len(sequences), self.concurrency)) for i in range(self.concurrency)]
        parts = [p for p in parts if p]

        def ask(part: list[int]) -> list[dict]:
            body = {"model": self.model_name, "prompt": [sequences[i] for i in part], "max_tokens": 1,
                    "temperature": 0.0, "prompt_logprobs": self.top_k}
            choices = self.client.post("/v1/completions", body).get("choices") or []
            if len(choices) != len(part):
                raise UserError(f"the teacher server answered {len(choices)} of {len(part)} prompts")
            return sorted(choices, key=lambda c: c.get("index", 0))

        started = time.perf_counter()
        with ThreadPoolExecutor(len(parts)) as pool:
            answers = list(pool.map(ask, parts))
        self.seconds += time.perf_counter() - started
        by_sequence: dict[int, dict] = {i: c for part, cs in zip(parts, answers, strict=True)
                                        for i, c in zip(part, cs, strict=True)}
        ids, values, rest = [], [], []
        for i, seq in enumerate(sequences):
            entries = by_sequence[i].get("prompt_logprobs")
            if entries is None:
                raise UserError("the teacher server returned no prompt_logprobs: it must support vLLM's "
                                "prompt_logprobs (vllm serve, or kdexp serve-teacher)")
            a, b, c = parse_prompt_logprobs(entries, seq, range(starts[i], len(seq)), self.top_k)
            ids += a
            values += b
            rest += c
        return (torch.tensor(ids, dtype=torch.long).reshape(-1, self.top_k),
                torch.tensor(values, dtype=torch.float32).reshape(-1, self.top_k),
                torch.tensor(rest, dtype=torch.float32))

    def inputs(self, examples: Sequence) -> dict[str, torch.Tensor]:
        sequences = [list(e.prompt_ids) + list(e.response_ids) for e in examples]
        ids, values, rest = self.score(sequences, [len(e.prompt_ids) for e in examples])
        return {"server_ids": ids, "server_logprobs": values, "server_rest": rest}

    def fused_distributions(self, batch: dict[str, torch.Tensor]) -> Sparse:
        mask = batch["targets"] != IGNORE_INDEX
        if int(mask.sum()) != batch["server_ids"].shape[0]:
            raise RuntimeError(f"the teacher server scored {batch['server_ids'].shape[0]} positions for a "
                               f"micro-batch with {int(mask.sum())} targets")
        # Each tail token's logit: log(rest / (V - k)), tempered by the loss like any logit.
        fill = (batch["server_rest"] - math.log(max(1, self.width - self.top_k))).clamp_min(MIN_LOG_REST)
        return Sparse(batch["server_ids"], batch["server_logprobs"], fill, self.width, mask)

    def distributions(self, batch: dict[str, torch.Tensor], autocast: bool = True) -> Logits:
        return self.fused_distributions(batch).logits()


def connect(cfg, student_tokenizer) -> ServerClient:
    """A client of ``teacher.url``, checked: reachable, the key accepted, the student's tokenizer."""
    t = cfg.teacher
    url = str(t.get("url") or "")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"teacher.source=server needs teacher.url=http://HOST:PORT (got {url or 'nothing'})")
    key_env = str(t.get("api_key_env") or "KDEXP_TEACHER_API_KEY")
    client = ServerClient(url, os.environ.get(key_env) or None, float(t.timeout), int(t.retries), key_env=key_env)
    models = client.get("/v1/models").get("data") or []
    if not models:
        raise UserError(f"the teacher server at {url} lists no model (GET /v1/models)")
    client.model = str(models[0]["id"])
    check_tokenizer(client, client.model, student_tokenizer)
    log.info("teacher: top-%d log-probabilities from the server %s (model %s)", int(t.top_k), url, client.model)
    return client


def check_tokenizer(client: ServerClient, model: str, tokenizer) -> None:
    """The server's model must tokenize like the student: a probe text's ids, and the text of
    the student's last token id (the vocabulary's end)."""
    def refuse(what: str) -> UserError:
        return UserError(f"the teacher server's model {model} tokenizes differently from the student "
                         f"({what}); token-level KD needs the student's vocabulary")

    want = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if client.post("/tokenize", {"model": model, "prompt": PROBE, "add_special_tokens": False}).get("tokens") != want:
        raise refuse("probe text")
    last = len(tokenizer) - 1
    try:
        text = client.post("/detokenize", {"model": model, "tokens": [last]}).get("prompt")
    except UserError as err:
        if "HTTP 400" not in str(err):
            raise
        raise refuse(f"its vocabulary ends before the student's token {last}") from None
    if text != tokenizer.decode([last]):
        raise refuse(f"token {last}")


__all__ = ["PROBE", "ServerClient", "ServerTeacher", "TeacherUnavailable", "check_tokenizer", "connect",
           "parse_prompt_logprobs"]
