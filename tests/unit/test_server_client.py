"""The served teacher's client (kdexp.teachers.server): vLLM's prompt_logprobs read into a
top-k-plus-tail distribution, and the link's retries, on hand-built answers and a real local
HTTP server (stdlib, in a thread)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kdexp.errors import UserError
from kdexp.losses.fused import Sparse
from kdexp.teachers.server import ServerClient, TeacherUnavailable, parse_prompt_logprobs

pytestmark = pytest.mark.unit


def entry(logp: torch.Tensor, token: int, k: int) -> dict:
    """vLLM's dict at one position: the top k by rank and the token itself."""
    order = logp.argsort(descending=True).tolist()
    out = {str(t): {"logprob": float(logp[t]), "rank": r + 1, "decoded_token": "x"} for r, t in enumerate(order[:k])}
    out.setdefault(str(token), {"logprob": float(logp[token]), "rank": order.index(token) + 1, "decoded_token": "y"})
    return out


def test_prompt_logprobs_become_the_top_k_and_the_rest_of_the_mass():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 11, generator=g, dtype=torch.float64).log_softmax(-1)
    ids = [4, 2, 9, 1]  # position i's entry scores ids[i] given ids[:i]
    entries = [None] + [entry(logp[i], ids[i + 1], 3) for i in range(3)]
    top_ids, values, rest = parse_prompt_logprobs(entries, ids, [2, 3], 3)
    for row, p in zip(range(2), [2, 3], strict=True):
        want = logp[p - 1].topk(3)
        assert top_ids[row] == want.indices.tolist()
        assert values[row] == pytest.approx(want.values.tolist(), abs=1e-12)
        assert rest[row] == pytest.approx(math.log(1 - float(want.values.exp().sum())), abs=1e-12)
    # the distribution the loss reads: exact on the top 3, the rest spread over the other 8 tokens
    fill = torch.tensor(rest) - math.log(11 - 3)
    mask = torch.tensor([[False, True, True]])
    dense = Sparse(torch.tensor(top_ids), torch.tensor(values, dtype=torch.float32), fill.float(), 11, mask).logits()
    probs = dense[0, 1:].softmax(-1).double()
    assert probs.sum(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    for row, p in enumerate([2, 3]):
        top = logp[p - 1].topk(3).indices
        assert probs[row, top].tolist() == pytest.approx(logp[p - 1, top].exp().tolist(), abs=1e-6)


@pytest.mark.parametrize("bad, match", [
    ("short", "for 3 positions of a 4-token sequence"),
    ("other_token", "do not cover the sequence's token"),
    ("few_ranks", "start it with --max-logprobs >= 3"),
])
def test_an_answer_that_does_not_cover_the_request_is_an_error(bad, match):
    logp = torch.randn(3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    ids = [4, 2, 9, 1]
    entries = [None] + [entry(logp[i], ids[i + 1], 3) for i in range(3)]
    if bad == "short":
        entries = entries[:3]
    elif bad == "other_token":
        entries[2] = entry(logp[1], (ids[2] + 1) % 11, 3)
        entries[2].pop(str(ids[2]), None)
    else:  # one ranked entry missing, not the actual token's (a position must name its token)
        gone = next(t for t, v in sorted(entries[3].items(), key=lambda x: x[1]["rank"]) if t != str(ids[3]))
        entries[3] = {t: v for t, v in entries[3].items() if t != gone}
    with pytest.raises(UserError, match=match):
        parse_prompt_logprobs(entries, ids, [1, 2, 3], 3)


class Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``fail`` requests, then 200; 401 without the right key."""

    fail, seen, key = 2, 0, "k1"

    def log_message(self, *_):
        pass

    def do_GET(self):  # noqa: N802
        type(self).seen += 1
        code = 401 if self.headers.get("Authorization") != f"Bearer {self.key}" else (
            503 if type(self).seen <= type(self).fail else 200)
        data = json.dumps({"ok": code == 200} if code == 200 else {"message": f"status {code}"}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky():
    Flaky.seen = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_5xx_is_retried_with_backoff_a_wrong_key_is_not(flaky):
    assert ServerClient(flaky, "k1", retries=3, backoff=0.01).get("/x") == {"ok": True}
    assert Flaky.seen == 3  # two 503s, then the answer
    Flaky.seen = 0
    with pytest.raises(TeacherUnavailable, match=r"unreachable \(HTTP 503 status 503\) after 2 tries"):
        ServerClient(flaky, "k1", retries=1, backoff=0.01).get("/x")
    Flaky.seen = 10
    with pytest.raises(UserError, match=r"refused the API key \(HTTP 401\): set \$MY_KEY") as err:
        ServerClient(flaky, "secret-value", retries=3, backoff=0.01, key_env="MY_KEY").get("/x")
    assert Flaky.seen == 11 and "secret-value" not in str(err.value)  # no retry; the key never shown


def test_a_refused_connection_is_retried_then_one_line():
    with pytest.raises(TeacherUnavailable, match="unreachable .* after 3 tries; start it, or check teacher.url"):
        ServerClient("http://127.0.0.1:9", None, timeout=2, retries=2, backoff=0.01).get("/v1/models")


def test_the_tail_is_floored_where_float32_cannot_resolve_it_and_bounded_by_the_actual_token():
    """A confident teacher: 1 - sum(top k) is below float32's resolution, so the tail is
    1e-6 (TAIL_FLOOR); an actual token outside the top k carries at least its own mass; logits
    passed off as log-probabilities are refused."""
    from kdexp.errors import UserError as Bad
    from kdexp.teachers.server import TAIL_FLOOR

    sure = {"7": {"logprob": -1e-9, "rank": 1}, "3": {"logprob": -25.0, "rank": 2}}
    assert parse_prompt_logprobs([None, sure], [0, 7], [1], 2)[2] == [pytest.approx(math.log(TAIL_FLOOR))]
    # float32 rounding left 1e-7 for the tail, but the actual token alone has 2.3e-6 of the mass
    seen = {"7": {"logprob": -1e-7, "rank": 1}, "3": {"logprob": -25.0, "rank": 2}, "9": {"logprob": -13.0, "rank": 3}}
    assert parse_prompt_logprobs([None, seen], [0, 9], [1], 2)[2] == [pytest.approx(-13.0)]
    logits = {"7": {"logprob": 3.0, "rank": 1}, "3": {"logprob": 1.0, "rank": 2}}
    with pytest.raises(Bad, match="must return log-probabilities"):
        parse_prompt_logprobs([None, logits], [0, 7], [1], 2)
