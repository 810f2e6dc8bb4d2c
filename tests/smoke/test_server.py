"""A served teacher: `kdexp serve-teacher` as a real process on localhost, `kdexp train
teacher.source=server` against it, and against a top-k cache of the same k (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, RUN_ENV, kdexp

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("teacher_available")]

KEY = "test-key-5d1c"  # the served teacher's API key in these tests
DATA = ["data.toy.n_train=96", "data.toy.n_valid=16", "data.toy.n_test=12"]


def serve(root: Path, *extra: str, key: str | None = KEY) -> tuple[subprocess.Popen, str]:
    """``kdexp serve-teacher`` on a free port; ``(process, url)`` once it answers."""
    run = root / f"serve{len(list(root.glob('serve*')))}"
    env = {**os.environ, **RUN_ENV}
    env.pop("KDEXP_TEACHER_API_KEY", None)
    if key:
        env["KDEXP_TEACHER_API_KEY"] = key
    proc = subprocess.Popen([sys.executable, "-m", "kdexp", "serve-teacher", "serve.port=0", *extra,
                             f"hydra.run.dir={run}"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "serve.json").is_file():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"kdexp serve-teacher did not start:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    url = json.loads((run / "serve.json").read_text())["url"]
    urllib.request.urlopen(url + "/health", timeout=10).close()
    return proc, url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    proc, url = serve(root)
    yield root, url
    proc.terminate()
    proc.wait(timeout=30)


def post(url: str, path: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_server_speaks_vllms_prompt_logprobs(server):
    """vLLM's answer layout: null for the first token, then per token the top k (ranks 1..k)
    and the token itself with its own rank; log-probabilities of one distribution."""
    _, url = server
    ids = [5, 17, 301, 44, 9]
    status, body = post(url, "/v1/completions", {"model": "x", "prompt": [ids, ids[:3]], "max_tokens": 1,
                                                 "temperature": 0, "prompt_logprobs": 4})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == 5 and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:], strict=True):
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:4] == [1, 2, 3, 4] and len(entry) in (4, 5) and str(token) in entry
        top = sorted(entry.values(), key=lambda v: v["rank"])[:4]
        assert all(a["logprob"] >= b["logprob"] for a, b in zip(top, top[1:], strict=False))
        assert sum(torch.tensor([v["logprob"] for v in top]).exp()) < 1 + 1e-5
    assert body["choices"][1]["prompt_logprobs"][1:] == [
        {t: v for t, v in e.items()} for e in entries[1:3]]  # the same prefix scores the same
    # a continuation of several tokens, sampled with a seed, is reproducible
    gen = {"model": "x", "prompt": ids, "max_tokens": 6, "temperature": 1.0, "seed": 3}
    assert post(url, "/v1/completions", gen)[1]["choices"][0]["token_ids"] == \
        post(url, "/v1/completions", gen)[1]["choices"][0]["token_ids"]


def test_the_server_requires_its_key_and_refuses_bad_requests(server):
    _, url = server
    ok = {"model": "x", "prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2}
    assert post(url, "/v1/completions", ok, key=None)[0] == 401
    assert post(url, "/v1/completions", ok, key="wrong")[0] == 401
    status, body = post(url, "/v1/completions", {**ok, "prompt_logprobs": 65})
    assert status == 400 and "max allowed: 64" in body["message"]
    assert post(url, "/v1/completions", {**ok, "prompt": "text"})[0] == 400
    assert post(url, "/v1/completions", {**ok, "prompt": [1, 10**6]})[0] == 400
    assert post(url, "/tokenize", {"prompt": "hello", "add_special_tokens": False})[0] == 200


def test_kd_from_the_server_matches_a_top_k_cache_of_the_same_k(server):
    """At T = 1 the served top-k plus tail is the cache's distribution (the cache rounds the
    log-probabilities to float16): the same losses, and final weights within 1e-4."""
    root, url = server
    args = [*FAST, *DATA, "loss.temperature=1", "train.log_every=1", "eval.max_samples=2", "eval.seeds=[10]"]
    kdexp("cache-teacher", *DATA, "loss.temperature=1", "teacher.top_k=8", "logger=none",
          f"hydra.run.dir={root / 'cache8'}", cwd=root)
    kdexp("train", *args, "teacher.source=cache", "teacher.top_k=8", f"hydra.run.dir={root / 'from_cache'}", cwd=root)
    proc = kdexp("train", *args, "teacher.source=server", f"teacher.url={url}", "teacher.top_k=8",
                 "teacher.concurrency=2", f"hydra.run.dir={root / 'from_server'}", cwd=root,
                 env={"KDEXP_TEACHER_API_KEY": KEY})
    assert "from the server" in proc.stdout + proc.stderr

    def rows(run):
        return [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(rows("from_cache"), rows("from_server"), strict=True):
        assert b["train/fkl"] == pytest.approx(a["train/fkl"], rel=2e-3)
    from safetensors.torch import load_file

    cache_w, server_w = (load_file(root / run / "final" / "model.safetensors") for run in ("from_cache", "from_server"))
    assert max(float((cache_w[n] - server_w[n]).abs().max()) for n in cache_w) < 1e-4
    assert KEY not in (root / "from_server" / "config.yaml").read_text() + (root / "from_server").joinpath(
        "train.log").read_text()


def test_kd_from_served_draws_matches_a_cache_of_draws(server):
    """teacher.sparse=sampled from the server: the draws are seeded by the sequence's tokens as
    the cache's are, so the served draws are the cache's (the same losses, up to the cache's
    float16 log-probabilities); a server without draws (vLLM's protocol) is refused in one line."""
    root, url = server
    sampled = ["teacher.sparse=sampled", "teacher.samples=6"]
    args = [*FAST, *DATA, "train.max_steps=3", "train.log_every=1", "eval.max_samples=2", "eval.seeds=[10]"]
    kdexp("cache-teacher", *DATA, *sampled, "logger=none", f"hydra.run.dir={root / 'draws6'}", cwd=root)
    kdexp("train", *args, *sampled, "teacher.source=cache", f"hydra.run.dir={root / 'drawn_cache'}", cwd=root)
    proc = kdexp("train", *args, *sampled, "teacher.source=server", f"teacher.url={url}",
                 f"hydra.run.dir={root / 'drawn_server'}", cwd=root, env={"KDEXP_TEACHER_API_KEY": KEY})
    assert "6 draws per position from the server" in proc.stdout + proc.stderr

    def rows(run):
        return [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(rows("drawn_cache"), rows("drawn_server"), strict=True):
        assert b["train/fkl"] == pytest.approx(a["train/fkl"], rel=2e-3, abs=1e-4)
    status, body = post(url, "/v1/completions", {"model": "x", "prompt": [5, 17, 301], "max_tokens": 1,
                                                 "temperature": 0, "kdexp_draws": {"n": 300, "temperature": 1,
                                                                                   "seed": 0}})
    assert status == 400 and "kdexp_draws must be" in body["message"]
    vllm_like = Gateway(url, 10**9, strip=("kdexp_draws",))
    try:
        refused = kdexp("train", *args, *sampled, "teacher.source=server", f"teacher.url={vllm_like.url}",
                        f"hydra.run.dir={root / 'no_draws'}", cwd=root, env={"KDEXP_TEACHER_API_KEY": KEY},
                        check=False)
    finally:
        vllm_like.close()
    assert refused.returncode != 0 and "does not draw from the teacher (kdexp_draws; vLLM has no such request)" in (
        refused.stderr)


def test_a_served_teacher_with_another_tokenizer_is_the_live_one(tmp_path):
    """teacher=tiny-other behind kdexp serve-teacher with loss.cross_tokenizer=span: the server
    scores the teacher's own tokens; with all of its 1532 log-probabilities (top_k = V) the
    distributions are the live teacher's, and so are the losses."""
    proc, url = serve(tmp_path, "teacher=tiny-other", "serve.max_logprobs=1532", key=None)
    try:
        args = [*FAST, *DATA, "teacher=tiny-other", "loss.cross_tokenizer=span", "train.max_steps=2",
                "train.log_every=1", "eval.max_samples=2", "eval.seeds=[10]"]
        kdexp("train", *args, f"hydra.run.dir={tmp_path / 'live'}", cwd=tmp_path)
        kdexp("train", *args, "teacher.source=server", f"teacher.url={url}", "teacher.top_k=1532",
              f"hydra.run.dir={tmp_path / 'served'}", cwd=tmp_path, env={"KDEXP_TEACHER_API_KEY": None})
        wrong = kdexp("train", *args, "teacher=tiny", "teacher.source=server", f"teacher.url={url}",
                      f"hydra.run.dir={tmp_path / 'wrong'}", cwd=tmp_path, env={"KDEXP_TEACHER_API_KEY": None},
                      check=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(rows("live"), rows("served"), strict=True):
        assert b["train/fkl_span"] == pytest.approx(a["train/fkl_span"], rel=1e-4)
    assert wrong.returncode != 0 and "tokenizes differently" in wrong.stderr  # teacher= must name its tokenizer


def test_served_teachers_among_several(server, tmp_path):
    """teachers.names may hold a server's address: a mixture of a served teacher with itself is
    that served teacher (the same losses as teacher.source=server), and route sends each family's
    rows to a live or a served teacher in one micro-batch."""
    root, url = server
    args = [*FAST, *DATA, "train.log_every=1", "teacher.top_k=8", "eval.max_samples=2", "eval.seeds=[10]"]
    key = {"KDEXP_TEACHER_API_KEY": KEY}
    kdexp("train", *args, "teacher.source=server", f"teacher.url={url}", f"hydra.run.dir={tmp_path / 'one'}",
          cwd=tmp_path, env=key)
    kdexp("train", *args, "teachers.rule=mixture", f"teachers.names=[{url},{url}]", "teachers.weights=[0.3,0.7]",
          f"hydra.run.dir={tmp_path / 'mix'}", cwd=tmp_path, env=key)
    routed = kdexp("train", *args, "teachers.rule=route", f"teachers.names=[tiny,{url}]", "teachers.route_key=family",
                   "teachers.route_map={repeat: tiny, fact: tiny, arith: tiny}", f"teachers.route_default={url}",
                   f"hydra.run.dir={tmp_path / 'route'}", cwd=tmp_path, env=key)
    assert "from the server" in routed.stdout + routed.stderr

    def fkl(run):
        return [json.loads(line)["train/fkl"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert fkl("mix") == pytest.approx(fkl("one"), rel=1e-5, abs=1e-6)
    assert all(0 < v < 20 for v in fkl("route"))


def test_a_wrong_key_an_unreachable_server_and_an_unfit_method_are_one_line_each(server, tmp_path):
    root, url = server
    base = [*FAST, *DATA, "teacher.source=server", "teacher.top_k=8"]
    wrong = kdexp("train", *base, f"teacher.url={url}", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path,
                  env={"KDEXP_TEACHER_API_KEY": "not-the-key"}, check=False)
    assert wrong.returncode == 2 and "refused the API key (HTTP 401)" in wrong.stderr
    assert "not-the-key" not in wrong.stderr + wrong.stdout and not (tmp_path / "a").exists()
    down = kdexp("train", *base, "teacher.url=http://127.0.0.1:9", "teacher.retries=1", "teacher.timeout=2",
                 f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, check=False)
    assert down.returncode == 2 and "unreachable" in down.stderr and down.stderr.count("kdexp: error") == 1
    okd = kdexp("train", *base, "method=okd", f"teacher.url={url}", f"hydra.run.dir={tmp_path / 'c'}",
                cwd=tmp_path, check=False)
    assert okd.returncode == 2 and "teacher.source=server scores text" in okd.stderr


class Gateway:
    """A real HTTP front of the server on its own port that goes down (503, as a gateway
    whose backend died) after ``fail_after`` scoring requests, until ``back()``; it drops the
    request fields ``strip`` (as a server that does not know them ignores them)."""

    def __init__(self, target: str, fail_after: int, strip: tuple[str, ...] = ()):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        gateway = self
        self.scored, self.fail_after, self.down = 0, fail_after, False

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def _forward(self, data: bytes | None) -> None:
                if self.path == "/v1/completions":
                    gateway.scored += 1
                    gateway.down = gateway.down or gateway.scored > gateway.fail_after
                if gateway.down:
                    status, body = 503, b'{"message": "backend down"}'
                else:
                    if data and strip:
                        data = json.dumps({k: v for k, v in json.loads(data).items() if k not in strip}).encode()
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
                    request = urllib.request.Request(target + self.path, data, headers,
                                                     method=self.command)
                    try:
                        with urllib.request.urlopen(request, timeout=60) as response:
                            status, body = response.status, response.read()
                    except urllib.error.HTTPError as err:
                        status, body = err.code, err.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                self._forward(None)

            def do_POST(self):  # noqa: N802
                self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def back(self) -> None:
        self.down, self.fail_after = False, 10**9

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_that_goes_down_ends_the_run_with_a_checkpoint_and_resuming_is_bit_identical(server):
    """Down after 4 steps (2 requests each): one line, a checkpoint of step 4; back, the
    resumed run ends with the uninterrupted run's weights, bit for bit."""
    root, url = server
    args = [*FAST, *DATA, "teacher.source=server", "teacher.top_k=8", "teacher.retries=1", "eval.max_samples=2",
            "eval.seeds=[10]"]
    env = {"KDEXP_TEACHER_API_KEY": KEY}
    kdexp("train", *args, f"teacher.url={url}", f"hydra.run.dir={root / 'whole'}", cwd=root, env=env)
    gateway = Gateway(url, fail_after=9)  # the start-up probe, then 4 steps of 2 micro-batches
    try:
        run = [*args, f"teacher.url={gateway.url}", f"hydra.run.dir={root / 'cut'}"]
        cut = kdexp("train", *run, cwd=root, env=env, check=False)
        errors = [line for line in cut.stderr.splitlines() if "error" in line.lower()]
        assert cut.returncode == 2 and len(errors) == 1 and "Traceback" not in cut.stderr, cut.stderr
        assert "unreachable (HTTP 503 backend down)" in cut.stderr and "checkpoint of step 4" in cut.stderr, cut.stderr[-600:]
        assert "train.resume=true" in cut.stderr
        assert sorted(p.name for p in (root / "cut" / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
        gateway.back()
        kdexp("train", *run, "train.resume=true", cwd=root, env=env)
    finally:
        gateway.close()
    from safetensors.torch import load_file

    whole, resumed = (load_file(root / r / "final" / "model.safetensors") for r in ("whole", "cut"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_a_server_with_another_tokenizer_is_refused(tmp_path):
    proc, url = serve(tmp_path, "teacher=markov", key=None)
    try:
        other = kdexp("train", *FAST, *DATA, "teacher.source=server", "teacher.top_k=4", f"teacher.url={url}",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert other.returncode == 2 and "tokenizes differently from the student (probe text)" in other.stderr
    assert not (tmp_path / "run").exists()


def test_teacher_outputs_are_generated_by_the_server(server, tmp_path):
    """SeqKD through the server: its greedy outputs are the live teacher's (kdexp's own
    sampler, greedy) token for token, kept in their own cache (keyed by the server, not the
    local teacher= files)."""
    _, url = server
    args = [*FAST, *DATA, "method=seqkd", "train.max_steps=2", "eval.max_samples=2", "eval.seeds=[10]"]
    kdexp("train", *args, f"hydra.run.dir={tmp_path / 'live'}", cwd=tmp_path)
    kdexp("train", *args, "teacher.source=server", f"teacher.url={url}", f"hydra.run.dir={tmp_path / 'served'}",
          cwd=tmp_path, env={"KDEXP_TEACHER_API_KEY": KEY})
    caches = sorted((tmp_path / ".kdexp-cache").glob("teacher-outputs-*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert len(caches) == 2  # one per teacher: the local model, the server
    live, served = ([json.loads(line) for line in c.read_text().splitlines()] for c in caches)
    assert len(live) == len(served) == 96
    same = sum(a == b for a, b in zip(live, served, strict=True))
    assert same >= 0.95 * len(live), f"{same} of {len(live)} greedy outputs agree"


def test_two_processes_stop_together_when_the_server_fails_under_one_of_them(server):
    """DDP over gloo, each process asking the server for its own micro-batches: the gateway fails
    mid-step for one of them; both stop (no hang in a collective) after a checkpoint."""
    root, url = server
    gateway = Gateway(url, fail_after=9)  # 2 start-up probes, 2 processes x 1 micro-batch a step: step 4 fails
    try:
        run = root / "ddp_cut"
        cut = kdexp("train", *FAST, *DATA, "teacher.source=server", "teacher.top_k=8", "teacher.retries=0",
                    f"teacher.url={gateway.url}", "eval.max_samples=2", "eval.seeds=[10]", f"hydra.run.dir={run}",
                    cwd=root, env={"KDEXP_TEACHER_API_KEY": KEY}, nproc=2, check=False, timeout=240)
    finally:
        gateway.close()
    assert cut.returncode != 0 and "teacher server" in cut.stderr, cut.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003"]
