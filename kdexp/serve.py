"""``kdexp serve-teacher``: a teacher's log-probabilities over HTTP, in vLLM's protocol.

    kdexp serve-teacher teacher=tiny                                   # http://127.0.0.1:8000
    KDEXP_TEACHER_API_KEY=secret kdexp serve-teacher teacher=qwen2.5-7b serve.port=8001
    kdexp serve-teacher teacher=tiny --api-key secret                  # as vllm serve --api-key

It serves the part of vLLM's OpenAI-compatible API that ``teacher.source=server``
(:mod:`kdexp.teachers.server`) uses, from any Hugging Face causal LM (any ``teacher=`` preset),
where vLLM is not available (a CPU, the tests) or to share one teacher among the jobs of a
sweep on one node:

- ``POST /v1/completions`` with token-id prompts (a list of ids, or a list of such lists),
  ``prompt_logprobs: K`` (at most ``serve.max_logprobs``) and ``max_tokens``: per prompt,
  ``prompt_logprobs`` as vLLM gives it (``null`` for the first token; for token ``i`` the K
  most likely tokens given tokens ``< i``, ranks 1..K, and token ``i`` with its own rank), and a
  continuation of up to ``max_tokens`` tokens as ``token_ids`` (greedy at ``temperature: 0``,
  else sampled with ``temperature``, ``top_p``, ``top_k`` and ``seed``; ending at EOS or one of
  ``stop_token_ids``, kept);
- kdexp's own extension: ``kdexp_draws: {n, temperature, seed}`` on the same request gives, per
  prompt, ``kdexp_draws``: ``null`` for the first token and, for token ``i``, n tokens drawn
  with replacement from the distribution at ``temperature`` given tokens ``< i``, as
  ``[ids, counts, logprobs]`` (the distinct tokens, how often each was drawn, each one's
  log-probability at that temperature), the draws seeded from ``seed`` and the prompt's tokens
  (``teacher.sparse=sampled``, :mod:`kdexp.losses.sampled`; vLLM has no such request);
- ``POST /tokenize`` (``prompt``, ``add_special_tokens``) and ``POST /detokenize`` (``tokens``);
- ``GET /v1/models`` and ``GET /health``.

Requests that arrive together (several jobs, or one job's concurrent requests) are scored in
one forward pass of up to ``serve.max_batch_tokens`` tokens. The server binds to
``serve.host`` (127.0.0.1 unless told otherwise); when the environment variable named by
``serve.api_key_env`` is set (or ``--api-key`` is given), every request but ``/health`` must
carry ``Authorization: Bearer KEY``, else it is answered 401 (vLLM checks its ``/v1`` routes).
Log-probabilities of ``-inf`` are sent as -9999, as vLLM does. It stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdexp.errors import UserError

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the server answers with HTTP 400 and this message."""


class Scorer:
    """One model's prompt log-probabilities, requests batched by a worker thread."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_tokens: int, max_logprobs: int):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        from kdexp.models import vocab_rows

        self.vocab = min(len(tokenizer), vocab_rows(model))  # padded logit rows are not tokens
        self.texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])  # each token's decoded_token
        self.max_batch_tokens, self.max_logprobs = max_batch_tokens, max_logprobs
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()  # one forward pass at a time (scoring and generation)
        threading.Thread(target=self._worker, daemon=True, name="kdexp-scorer").start()

    def score(self, prompts: list[list[int]], k: int) -> list[tuple[list[dict | None], int]]:
        """vLLM's ``prompt_logprobs`` of each prompt and its greedy next token, batched with
        other requests."""
        future: Future = Future()
        self.jobs.put((prompts, k, future))
        return future.result()

    def _worker(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            tokens = sum(len(p) for p in jobs[0][0])
            time.sleep(0.002)  # let requests that arrive together share the forward pass
            while True:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                jobs.append(nxt)
                tokens += sum(len(p) for p in nxt[0])
                if tokens >= self.max_batch_tokens:
                    break
            prompts = [p for ps, _, _ in jobs for p in ps]
            k = max(j[1] for j in jobs)
            try:
                scored = self._score_all(prompts, k)
            except Exception as err:  # noqa: BLE001 (answered to each waiting request)
                for _, _, future in jobs:
                    future.set_exception(err)
                continue
            at = 0
            for ps, kj, future in jobs:
                future.set_result([(_cut(e, kj, p), nxt) for p, (e, nxt) in zip(ps, scored[at:at + len(ps)],
                                                                                  strict=True)])
                at += len(ps)

    def _score_all(self, prompts: list[list[int]], k: int) -> list[tuple[list[dict | None], int]]:
        out: list = []
        batch: list[int] = []
        tokens = 0
        for p in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):  # similar lengths together
            batch.append(p)
            tokens += len(prompts[p])
            if tokens >= self.max_batch_tokens:
                out += list(zip(batch, self._forward([prompts[i] for i in batch], k), strict=True))
                batch, tokens = [], 0
        if batch:
            out += list(zip(batch, self._forward([prompts[i] for i in batch], k), strict=True))
        return [s for _, s in sorted(out, key=lambda x: x[0])]

    @torch.inference_mode()
    def _forward(self, prompts: list[list[int]], k: int) -> list[tuple[list[dict | None], int]]:
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, :len(p)], mask[b, :len(p)] = torch.tensor(p), 1
        with self.lock:
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        result = []
        for b, p in enumerate(prompts):
            n = len(p) - 1  # positions 0..n-1 predict tokens 1..n; position n the next token
            greedy = int(logits[b, n, :self.vocab].argmax())
            if n <= 0:
                result.append(([None] * len(p), greedy))
                continue
            # float32, -inf and NaN sent as -9999 (as vLLM does: JSON has neither)
            logp = torch.log_softmax(logits[b, :n, :self.vocab].float(), dim=-1).nan_to_num(-9999.0).clamp_min(-9999.0)
            top = logp.topk(min(k, self.vocab), dim=-1)
            actual = torch.tensor(p[1:], device=logp.device)
            own = logp.gather(1, actual[:, None]).squeeze(1)
            rank = (logp >= own[:, None]).sum(-1)  # vLLM's rank: the tokens at least as likely, itself included
            top_ids, top_lp = top.indices.tolist(), top.values.tolist()
            own_l, rank_l = own.tolist(), rank.tolist()
            entries: list[dict | None] = [None]
            for i in range(n):
                entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": self.texts[t]}
                         for r, (t, lp) in enumerate(zip(top_ids[i], top_lp[i], strict=True))}
                entry.setdefault(str(p[i + 1]), {"logprob": own_l[i], "rank": int(rank_l[i]),
                                                 "decoded_token": self.texts[p[i + 1]]})
                entries.append(entry)
            result.append((entries, greedy))
        return result

    @torch.inference_mode()
    def draws(self, prompts: list[list[int]], n: int, temperature: float, seed: int) -> list[tuple[list, int]]:
        """n draws at each position of each prompt (``kdexp_draws``) and its greedy next token,
        one prompt at a time: the draws of a prompt depend on its tokens and ``seed`` alone, not
        on the requests it came with (:func:`kdexp.losses.sampled.draw_sequence`, as the cache)."""
        from kdexp.losses.sampled import draw_sequence

        out = []
        for p in prompts:
            ids = torch.tensor([p], device=self.device)
            with self.lock:
                logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :, :self.vocab]
            picked, counts, values = draw_sequence(logits, p, n, temperature, seed)
            rows = zip(picked.tolist(), counts.tolist(), values.clamp_min(-9999.0).tolist(), strict=True)
            out.append(([None, *([a, b, c] for a, b, c in rows)], int(logits[-1].argmax())))
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, top_k: int = -1, stop_ids: list[int] | None = None) -> list[list[int]]:
        """Continuations of up to ``max_tokens`` tokens, each ending at its first stop token
        (EOS or ``stop_ids``, kept), from a left-padded batch."""
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
        sample = temperature > 0
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            stops = sorted({self.tokenizer.eos_token_id, *(stop_ids or [])} - {None})
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_tokens, do_sample=sample, pad_token_id=pad,
                                      eos_token_id=stops or None,
                                      **({"temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0)}
                                         if sample else {}))
        result = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            result.append(row[:cut])
        return result


def _cut(entries: list[dict | None], k: int, prompt: list[int]) -> list[dict | None]:
    """A batch scored at the largest k of its requests, cut back to this request's k (and
    each position's own token)."""
    return [None if entry is None else {t: v for t, v in entry.items() if v["rank"] <= k or t == str(token)}
            for entry, token in zip(entries, prompt, strict=True)]


def handler(scorer: Scorer, name: str, max_len: int, api_key: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # the access log: debug only
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, body: dict | None = None) -> None:
            data = json.dumps(body if body is not None else {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, kind: str) -> None:
            self._send(code, {"object": "error", "message": message, "type": kind, "code": code})

        def _authorized(self) -> bool:
            if not api_key:
                return True
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return True
            self._error(401, "invalid or missing API key", "Unauthorized")
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                return self._send(200)
            if not self._authorized():
                return None
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": name, "object": "model",
                                                                     "owned_by": "kdexp", "max_model_len": max_len}]})
            return self._error(404, f"no route {self.path}", "NotFound")

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length, self.close_connection = 0, True
            data = self.rfile.read(length)  # read before any answer: the connection stays in step
            if not self._authorized():
                return None
            try:
                body = json.loads(data or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                routes = {"/v1/completions": self._completions, "/tokenize": self._tokenize,
                          "/detokenize": self._detokenize}
                if self.path not in routes:
                    return self._error(404, f"no route {self.path}", "NotFound")
                return self._send(200, routes[self.path](body))
            except (BadRequest, json.JSONDecodeError, ValueError, TypeError, KeyError) as err:
                return self._error(400, str(err) or type(err).__name__, "BadRequestError")
            except Exception as err:  # noqa: BLE001 (a server error, answered, the server goes on)
                log.exception("serve-teacher: request failed")
                return self._error(500, f"{type(err).__name__}: {err}", "InternalServerError")

        def _completions(self, body: dict) -> dict:
            prompts = body.get("prompt")
            if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
                prompts = [prompts]
            if not (isinstance(prompts, list) and prompts and all(
                    isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < scorer.vocab for t in p)
                    for p in prompts)):
                raise BadRequest(f"prompt must be token ids (a list of ints in [0, {scorer.vocab}), or a list of "
                                 f"such lists); this server does not tokenize text prompts")
            if any(len(p) >= max_len for p in prompts):
                raise BadRequest(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room for a new token "
                                 f"in the model's {max_len} positions")
            k = body.get("prompt_logprobs")
            if k is not None and (not isinstance(k, int) or k < 0 or k > scorer.max_logprobs):
                raise BadRequest(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                 f"{scorer.max_logprobs}" if isinstance(k, int) and k > 0 else
                                 "prompt_logprobs must be an integer >= 0")
            max_tokens = int(body.get("max_tokens", 16))
            if max_tokens < 1:
                raise BadRequest("max_tokens must be >= 1")
            temperature = float(body.get("temperature", 1.0))
            drawn = self._draws(body.get("kdexp_draws"), prompts)
            scored = scorer.score(prompts, max(k, 1)) if k is not None else None
            if (scored or drawn) is not None and max_tokens == 1 and temperature == 0:  # scoring: the pass gave it
                gen = [[nxt] for _, nxt in (scored or drawn)]
            else:
                stop_ids = body.get("stop_token_ids") or []
                if not all(isinstance(t, int) for t in stop_ids):
                    raise BadRequest("stop_token_ids must be a list of token ids")
                gen = scorer.generate(prompts, max_tokens, temperature, float(body.get("top_p", 1.0)),
                                      body.get("seed"), int(body.get("top_k", -1)), stop_ids)
            scored = [None] * len(prompts) if scored is None else [e for e, _ in scored]
            stops = {scorer.tokenizer.eos_token_id, *(body.get("stop_token_ids") or [])}
            choices = [{"index": i, "text": scorer.tokenizer.decode(g), "token_ids": g, "logprobs": None,
                        "finish_reason": "stop" if g and g[-1] in stops else "length",
                        "stop_reason": g[-1] if g and g[-1] in stops and g[-1] != scorer.tokenizer.eos_token_id
                        else None, "prompt_logprobs": s, "prompt_token_ids": p,
                        **({} if drawn is None else {"kdexp_draws": drawn[i][0]})}
                       for i, (p, g, s) in enumerate(zip(prompts, gen, scored, strict=True))]
            tokens = sum(len(p) for p in prompts)
            generated = sum(len(g) for g in gen)
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": name, "choices": choices,
                    "usage": {"prompt_tokens": tokens, "completion_tokens": generated,
                              "total_tokens": tokens + generated}}

        def _draws(self, spec: Any, prompts: list[list[int]]) -> list | None:
            if spec is None:
                return None
            n, temperature, seed = (spec.get(k) if isinstance(spec, dict) else None for k in ("n", "temperature", "seed"))
            if not (isinstance(n, int) and 1 <= n <= 255 and isinstance(temperature, (int, float)) and temperature > 0
                    and isinstance(seed, int) and seed >= 0):
                raise BadRequest("kdexp_draws must be {n: 1..255, temperature: > 0, seed: >= 0}")
            return scorer.draws(prompts, n, float(temperature), seed)

        def _tokenize(self, body: dict) -> dict:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise BadRequest("prompt must be a string")
            ids = scorer.tokenizer(text, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
            return {"count": len(ids), "max_model_len": max_len, "tokens": ids}

        def _detokenize(self, body: dict) -> dict:
            tokens = body.get("tokens")
            if not (isinstance(tokens, list) and all(isinstance(t, int) and 0 <= t < len(scorer.tokenizer)
                                                     for t in tokens)):
                raise BadRequest(f"tokens must be a list of token ids in [0, {len(scorer.tokenizer)})")
            return {"prompt": scorer.tokenizer.decode(tokens)}

    return Handler


def run_serve(cfg: DictConfig, run_dir: Path) -> None:
    """``kdexp serve-teacher``: load ``teacher=`` and serve it until Ctrl-C or SIGTERM."""
    from kdexp.models import load_model

    s, teacher = cfg.serve, cfg.teacher
    if not teacher.get("name_or_path"):
        raise UserError("kdexp serve-teacher serves a model: choose it with teacher=NAME")
    key_env = str(s.api_key_env)
    api_key = os.environ.get(key_env) or None
    model, tokenizer = load_model(teacher, "teacher")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    name = str(teacher.name_or_path)
    scorer = Scorer(model, tokenizer, int(s.max_batch_tokens), int(s.max_logprobs))
    try:
        server = ThreadingHTTPServer((str(s.host), int(s.port)), handler(scorer, name, max_len, api_key))
    except OSError as err:
        raise UserError(f"kdexp serve-teacher cannot listen on {s.host}:{s.port} ({err.strerror}); "
                        f"choose another serve.port") from None
    server.daemon_threads = True
    host, port = server.server_address[:2]
    stop = threading.Event()

    def shutdown(*_: Any) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, shutdown)
    if str(s.host) not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who reaches this port can use the teacher", s.host)
    url = f"http://{host}:{port}"
    (run_dir / "serve.json").write_text(json.dumps({"url": url, "model": name, "pid": os.getpid()}) + "\n")
    print(f"kdexp serve-teacher: {name} on {url} ({'API key required' if api_key else 'no API key'}; "
          f"kdexp train teacher.source=server teacher.url={url})", flush=True)
    log.info("serving %s on %s on %s", name, url, device)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        signal.signal(signal.SIGTERM, previous)
        log.info("serve-teacher stopped")


__all__ = ["Scorer", "handler", "run_serve"]
