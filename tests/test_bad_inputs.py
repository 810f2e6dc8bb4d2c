"""Every mistake a user can make in a config or a dataset, through the real CLI.

Each case asserts: the exit status, that the message names the problem (one ``kdexp: error:``
line per problem), that no traceback is printed, and that nothing under the working directory
was created or changed: no run directory, no checkpoint, no cache, and an existing run is left
exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kdexp.models import ASSETS
from tests.conftest import FAST, kdexp

pytestmark = pytest.mark.slow

Setup = Callable[[Path], list[str]]  # writes files under the working directory, returns extra args


def rows(n: int, **change) -> list[dict]:
    return [{"instruction": f"Say hi {i}.", "input": "", "output": "hi", **change} for i in range(n)]


def jsonl(name: str, lines: list, extra: tuple[str, ...] = ()) -> Setup:
    """A data file of ``lines`` (dicts are JSON-encoded; bytes and str are written as they are)."""

    def setup(cwd: Path) -> list[str]:
        blob = b"".join((json.dumps(x).encode() if isinstance(x, dict) else
                         x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
        (cwd / name).write_bytes(blob)
        return ["data=jsonl", f"data.path={name}", "data.split.valid=4", "data.split.test=4", *extra]

    return setup


def with_line(i: int, line, n: int = 30) -> list:
    out: list = rows(n)
    out[i] = line
    return out


def existing_run(*extra: str) -> Setup:
    """A finished run in ``run/`` (trained for one step): the case must leave it untouched."""

    def setup(cwd: Path) -> list[str]:
        kdexp("train", *FAST, "train.max_steps=1", "train.save_every=1", "eval.max_new_tokens=4",
              "hydra.run.dir=run", cwd=cwd)
        return ["hydra.run.dir=run", *extra]

    return setup


def other_tokenizer(cwd: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-teacher")
    tok.add_tokens(["<an-extra-token>"])
    tok.save_pretrained(cwd / "other-teacher")
    return ["teacher.name_or_path=other-teacher"]


def lossy_tokenizer(cwd: Path) -> list[str]:
    """A teacher whose tokenizer lowercases the text: its decoding does not give the text back."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-teacher-other")
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    tok.save_pretrained(cwd / "lossy-teacher")
    return ["teacher.name_or_path=lossy-teacher", "loss.cross_tokenizer=span"]


def read_only_dir(cwd: Path) -> list[str]:
    """A read-only file system (root ignores permission bits); skipped where mounting is not allowed."""
    target = cwd / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
    else:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)],
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("cannot mount a read-only file system here")
    return [f"hydra.run.dir={target / 'run'}"]


def file_in_the_way(cwd: Path) -> list[str]:
    (cwd / "a_file").write_text("")
    return ["hydra.run.dir=a_file/run"]


def pt_missing(cwd: Path) -> list[str]:
    return ["method=minillm", "method.pt_data=no-such-corpus.jsonl"]


# (id, command, args, what the message must contain, a setup, the exit status)
CASES: list[tuple[str, str, list[str], list[str], Setup | None]] = [
    # --- the command line and config groups
    ("unknown-command", "trian", [], ["unknown command 'trian'", "did you mean 'train'"], None),
    ("unknown-method", "train", ["method=gdk"], ["method option 'gdk'", "did you mean 'gkd'"], None),
    ("unknown-loss", "train", ["loss=fk1"], ["loss option 'fk1'", "did you mean 'fkl'"], None),
    ("group-set-to-null", "train", ["experiment=gpt2_base", "deepspeed=null"], ["deepspeed=null is not an option of deepspeed", "~deepspeed"], None),
    ("unknown-student", "train", ["student=gtp2"], ["student option 'gtp2'", "did you mean 'gpt2'"], None),
    ("typo-in-key", "train", ["train.max_step=5"], ["unknown option 'train.max_step'", "did you mean 'train.max_steps'"], None),
    ("unparsable-override", "train", ["train.max_steps=[1,"], ["cannot parse the overrides"], None),
    # --- values out of range
    ("zero-steps", "train", ["train.max_steps=0"], ["train.max_steps must be an integer > 0, got 0"], None),
    ("negative-temperature", "train", ["loss.temperature=-1"], ["loss.temperature must be > 0"], None),
    ("lmbda-above-one", "train", ["method=gkd", "method.lmbda=1.5"], ["method.lmbda must be in [0, 1]", "1.5"], None),
    ("beta-above-one", "train", ["loss=jsd", "loss.beta=2"], ["beta", "2"], None),
    ("kd-weight", "train", ["method.kd_weight=1.2"], ["method.kd_weight must be in [0, 1]"], None),
    ("negative-seed", "train", ["seed=-3"], ["seed must be an integer >= 0"], None),
    ("prompt-longer-than-total", "train", ["data.max_prompt_length=600"], ["data.max_prompt_length (600) must be smaller than data.max_length"], None),
    ("top-p", "eval", ["model=tiny", "eval.top_p=1.5"], ["eval.top_p must be in (0, 1]"], None),
    ("eval-without-a-model", "eval", [], ["model="], None),
    ("eval-a-folder-that-is-no-model", "eval", [], ["notes is neither a run directory", "nor a model directory"],
     lambda cwd: (cwd / "notes").mkdir() or (cwd / "notes" / "todo.txt").write_text("x") and ["model=notes"]),
    ("eval-an-unfinished-run", "eval", [], ["unfinished holds a run without its final student", "train.resume=true"],
     lambda cwd: (cwd / "unfinished").mkdir() or (cwd / "unfinished" / "config.yaml").write_text("seed: 1\n")
     and ["model=unfinished"]),
    ("bad-bad-steps", "train", ["train.max_bad_steps=0"], ["train.max_bad_steps must be an integer > 0"], None),
    ("on-error-value", "train", ["data.on_error=ignore"], ["data.on_error must be fail or skip"], None),
    ("student-init", "train", ["student.init=zeros"], ["student.init", "zeros"], None),
    # --- combinations that make no sense
    ("batch-not-multiple", "train", ["train.batch_size=12", "train.micro_batch_size=8"], ["must be a multiple of train.micro_batch_size"], None),
    ("rollouts-without-tokens", "train", ["method=gkd", "rollout.max_new_tokens=0"], ["rollout.max_new_tokens must be an integer > 0"], None),
    ("okd-without-teacher", "train", ["method=okd", "teacher=none"], ["method=okd needs a teacher", "teacher=NAME"], None),
    ("kd-without-teacher", "train", ["method=kd", "teacher=none"], ["method=kd needs a teacher"], None),
    ("cache-without-cache", "train", ["teacher.source=cache"], ["no teacher cache at", "kdexp cache-teacher"], None),
    ("sample-weight-under-deepspeed", "train", ["method.sample_weight=teacher_likelihood", "deepspeed=zero2"], ["method.sample_weight=teacher_likelihood is normalized over the optimizer step", "without deepspeed="], None),
    ("cache-with-on-policy", "train", ["method=gkd", "teacher.source=cache"], ["teacher.source=cache serves methods", "method=gkd"], None),
    ("server-without-url", "train", ["teacher.source=server"], ["teacher.source=server needs teacher.url=http://HOST:PORT"], None),
    ("server-unreachable", "train", ["teacher.source=server", "teacher.url=http://127.0.0.1:9", "teacher.retries=0"], ["teacher server at http://127.0.0.1:9 is unreachable", "after 1 tries"], None),
    ("server-with-minillm", "train", ["method=minillm", "teacher.source=server", "teacher.url=http://127.0.0.1:9"], ["teacher.source=server scores text and generates", "method=minillm", "teacher.source=live"], None),
    ("server-retries", "train", ["teacher.retries=-1"], ["teacher.retries must be an integer >= 0"], None),
    ("serve-port", "serve-teacher", ["serve.port=70000"], ["serve.port must be a port number"], None),
    ("teachers-empty", "train", ["teachers.rule=mixture"], ["teachers.rule=mixture needs teachers.names"], None),
    ("teachers-unknown-rule", "train", ["teachers.rule=vote", "teachers.names=[tiny]"], ["teachers.rule must be route, mixture, relative, mot or null", "vote"], None),
    ("teachers-mot-one", "train", ["teachers.rule=mot", "teachers.names=[tiny]"], ["teachers.rule=mot merges branches of two or more teachers"], None),
    ("teachers-mot-steps", "train", ["teachers.rule=mot", "teachers.names=[tiny,tiny]", "teachers.branch_steps=40", "train.max_steps=300"], ["would end inside a round", "e.g. train.max_steps=320"], None),
    ("teachers-mot-zero-steps", "train", ["teachers.rule=mot", "teachers.names=[tiny,tiny]", "teachers.branch_steps=0"], ["teachers.branch_steps must be an integer > 0"], None),
    ("teachers-mot-no-names", "train", ["teachers.rule=mot", "teachers.names=null"], ["teachers.names must be a list"], None),
    ("teachers-served-unreachable", "train", ["teachers.rule=mixture", "teachers.names=[tiny,http://127.0.0.1:9]", "teacher.retries=0"], ["teacher server at http://127.0.0.1:9 is unreachable"], None),
    ("teachers-mot-lora", "train", ["teachers.rule=mot", "teachers.names=[tiny,tiny]", "student.lora.enabled=true"], ["averaging LoRA's factors", "student.lora.enabled=false"], None),
    ("cross-tokenizer-off", "train", ["teacher=tiny-other"], ["use different tokenizers", "loss.cross_tokenizer=span"], None),
    ("cross-tokenizer-unknown", "train", ["teacher=tiny-other", "loss.cross_tokenizer=dskd"], ["loss.cross_tokenizer must be uld, span or null"], None),
    ("cross-tokenizer-cache", "train", ["teacher=tiny-other", "loss.cross_tokenizer=uld", "teacher.source=cache"], ["works with one live or served teacher", "another tokenizer does not"], None),
    ("sampled-live", "train", ["teacher.sparse=sampled"], ["teacher.sparse=sampled reads draws from one teacher's cache", "teacher.source=cache"], None),
    ("sampled-rkl", "train", ["teacher.sparse=sampled", "teacher.source=cache", "loss=rkl"], ["teacher.sparse=sampled estimates fkl, skl, tvd without bias; loss=rkl", "teacher.sparse=topk"], None),
    ("sampled-teacher-likelihood", "train", ["teacher.sparse=sampled", "teacher.source=cache", "method.sample_weight=teacher_likelihood"], ["sample_weight=teacher_likelihood needs the teacher's probability of every target token"], None),
    ("sampled-samples", "cache-teacher", ["teacher.sparse=sampled", "teacher.samples=0"], ["teacher.samples must be an integer from 1 to 255"], None),
    ("sampled-unknown", "train", ["teacher.sparse=random"], ["teacher.sparse must be topk or sampled", "random"], None),
    ("cross-tokenizer-teacher-outputs", "train", ["teacher=tiny-other", "loss.cross_tokenizer=span", "method=seqkd"], ["method=seqkd trains, generates with or samples from the teacher"], None),
    ("cross-tokenizer-lossy", "train", [], ["the teacher's tokenizer does not give back the text it encodes", "lossless"], lossy_tokenizer),
    ("fsdp-and-deepspeed", "train", ["fsdp=full_shard", "deepspeed=zero2"], ["fsdp= and deepspeed= are two engines", "~deepspeed"], None),
    ("fsdp-fp16", "train", ["fsdp=full_shard", "train.mixed_precision=fp16"], ["fsdp= trains in float32 or bf16", "train.mixed_precision=bf16"], None),
    ("fsdp-lora", "train", ["fsdp=full_shard", "student.lora.enabled=true"], ["fsdp= with a LoRA student is not supported"], None),
    ("rollout-vllm-without-gpu", "train", ["method=gkd", "rollout.engine=vllm"], ["rollout.engine=vllm generates on GPUs", "rollout.engine=hf"], None),
    ("rollout-engine-unknown", "train", ["method=gkd", "rollout.engine=sglang"], ["rollout.engine=sglang is not one of hf, vllm"], None),
    ("rollout-sync-every", "train", ["method=gkd", "rollout.sync_every=0"], ["rollout.sync_every must be an integer >= 1"], None),
    ("fsdp-mot", "train", ["fsdp=full_shard", "teachers.rule=mot", "teachers.names=[tiny,tiny]"], ["which fsdp= partitions"], None),
    ("teachers-unknown-name", "train", ["teachers.rule=mixture", "teachers.names=[tiny,tinyy]"], ["teachers.names entry 'tinyy'", "did you mean 'tiny'"], None),
    ("teachers-relative-three", "train", ["teachers.rule=relative", "teachers.names=[tiny,tiny,tiny]"], ["teachers.rule=relative takes two teachers"], None),
    ("teachers-weights", "train", ["teachers.rule=mixture", "teachers.names=[tiny,tiny]", "teachers.weights=[1]"], ["teachers.weights has 1 weights for 2 teachers"], None),
    ("teachers-route-column", "train", ["teachers.rule=route", "teachers.names=[tiny]", "teachers.route_key=teacher_name"], ["lack it", "teachers.route_key"], None),
    ("teachers-route-unknown", "train", ["teachers.rule=route", "teachers.names=[tiny]", "teachers.route_key=family"], ["name teachers that teachers.names lacks", "teachers.route_map"], None),
    ("teachers-without-teacher-loss", "train", ["method=sft", "teachers.rule=mixture", "teachers.names=[tiny,tiny]"], ["method=sft reads no teacher", "drop teachers.rule"], None),
    ("teachers-names-not-a-list", "train", ["teachers.rule=mixture", "teachers.names=tiny"], ["teachers.names must be a list"], None),
    ("teachers-route-map-numbers", "train", ["teachers.rule=route", "teachers.names=[tiny]", "teachers.route_key=family", "teachers.route_map={repeat: tiny}"], ["name teachers that teachers.names lacks", "fact"], None),
    ("teachers-with-okd", "train", ["method=okd", "teachers.rule=mixture", "teachers.names=[tiny,tiny]"], ["teachers.rule=mixture combines live teachers", "method=okd"], None),
    ("fused-value", "train", ["loss.fused=maybe"], ["loss.fused must be auto, true or false"], None),
    ("fused-required-but-impossible", "train", ["method=minillm", "loss.fused=true"], ["loss.fused=true, but the fused path cannot run", "terms other than CE and divergences", "loss.fused=auto"], None),
    ("tokenizer-mismatch", "train", [], ["use different tokenizers", "other-teacher"], other_tokenizer),
    ("missing-model", "train", ["student.name_or_path=no-such-model-dir"], ["no-such-model-dir"], None),
    ("missing-pretraining-corpus", "train", [], ["method.pt_data", "no-such-corpus.jsonl"], pt_missing),
    # --- the run directory
    ("run-exists", "train", [], ["already holds a run", "train.resume=true"], existing_run()),
    ("resume-other-config", "train", ["train.resume=true", "train.lr=0.1"], ["different config", "train.lr"], existing_run()),
    ("resume-nothing", "train", ["train.resume=true", "hydra.run.dir=fresh"], ["has no checkpoint"], None),
    ("output-is-a-file", "train", [], ["cannot be created", "not a directory"], file_in_the_way),
    ("read-only-output", "train", [], ["not writable"], read_only_dir),
    # --- data files
    ("data-file-missing", "train", ["data=jsonl", "data.path=nope.jsonl"], ["data file not found", "nope.jsonl"], None),
    ("data-path-unset", "train", ["data=jsonl"], ["data.path"], None),
    ("malformed-jsonl", "train", [], ["d.jsonl:7:", "malformed JSON", "data.on_error=skip"], jsonl("d.jsonl", with_line(6, '{"instruction": "broken", '))),
    ("not-utf8", "train", [], ["d.jsonl:3:", "not UTF-8"], jsonl("d.jsonl", with_line(2, b'{"instruction": "caf\xe9", "output": "x"}'))),
    ("not-an-object", "train", [], ["d.jsonl:5:", "expected a JSON object"], jsonl("d.jsonl", with_line(4, "[1, 2]"))),
    ("missing-field", "train", [], ["d.jsonl:2:", "missing field 'output'"], jsonl("d.jsonl", with_line(1, {"instruction": "x"}))),
    ("empty-response", "train", [], ["d.jsonl:4:", "the output is empty"], jsonl("d.jsonl", with_line(3, {"instruction": "x", "output": "  "}))),
    ("everything-skipped", "train", [], ["all 30 rows", "skipped as bad"], jsonl("d.jsonl", rows(30, output=""), ("data.on_error=skip",))),
    ("empty-file", "train", [], ["holds no records"], jsonl("d.jsonl", [])),
    ("prompt-too-long", "train", [], ["data.max_prompt_length=256", "data.too_long"], jsonl("d.jsonl", with_line(3, {"instruction": "word " * 400, "output": "x"}))),
    ("too-few-records", "train", [], ["not enough for", "data.split.test"], jsonl("d.jsonl", rows(6))),
    ("wrong-field-name", "train", [], ["missing field 'answer'", "data.fields.output"], jsonl("d.jsonl", rows(30), ("data.fields.output=answer",))),
    ("split-smaller-than-a-batch", "train", ["data.toy.n_train=3"], ["fewer than one micro-batch"], None),
    ("markov-data-without-its-teacher", "train", ["data=markov"], ["data=markov samples its teacher's chain", "teacher=markov"], None),
    ("markov-data-lengths", "train", ["data=markov", "teacher=markov", "student=markov", "data.max_length=40"],
     ["data.max_length=50"], None),
    # --- schedules, evaluation sets, experiments
    ("negative-epochs", "train", ["train.epochs=-1"], ["train.epochs must be > 0 or null, got -1"], None),
    ("warmup-ratio-one", "train", ["train.warmup_ratio=1"], ["train.warmup_ratio must be in [0, 1) or null"], None),
    ("unknown-schedule", "train", ["train.lr_schedule=cosin"], ["train.lr_schedule must be linear, cosine or constant"], None),
    ("unknown-eval-set", "train", ["eval.sets=[toy,vicnua]"], ["eval.sets entry 'vicnua'", "did you mean 'vicuna'"], None),
    ("eval-set-file-missing", "train", ["eval.sets=[toy,self_inst]", "eval.data_dir=nowhere"],
     ["evaluation set self_inst (eval.sets)", "nowhere/self-inst/valid.jsonl", "eval.data_dir"], None),
    ("unknown-experiment", "train", ["experiment=gpt2_bse"], ["experiment option 'gpt2_bse'", "did you mean 'gpt2_base'"], None),
    ("experiment-needs-its-corpus", "train", ["experiment=minillm_gpt2_base"], ["method.pt_data: openwebtext.jsonl is not a file"], None),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's content hash, or ``dir``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def test_there_are_at_least_30_distinct_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command, args, needles, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, command, args, needles, setup):
    extra = setup(tmp_path) if setup else []
    before = snapshot(tmp_path)
    try:
        proc = kdexp(command, *FAST, *extra, *args, cwd=tmp_path, check=False)
    finally:
        if (tmp_path / "ro").is_mount():
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdexp: error:")]
    assert errors, proc.stderr[-3000:]
    for needle in needles:
        assert any(needle in line for line in errors), (needle, errors)
    after = snapshot(tmp_path)
    assert after == before, {k: after.get(k) for k in set(after) ^ set(before) | {k for k in before if after.get(k) != before[k]}}


def test_all_problems_are_reported_at_once(tmp_path):
    proc = kdexp("train", *FAST, "train.max_steps=0", "loss.temperature=-1", "train.max_step=5", "method=gkd",
                 "method.lmbda=2", "train.batch_size=6", cwd=tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdexp: error:")]
    assert proc.returncode == 2 and len(errors) == 5, proc.stderr[-3000:]
    for needle in ("train.max_steps must", "loss.temperature must", "unknown option 'train.max_step'",
                   "method.lmbda must", "train.batch_size (6)"):
        assert sum(needle in line for line in errors) == 1, (needle, errors)
    assert not any(tmp_path.iterdir())


def test_a_sweep_value_out_of_range_fails_before_any_job(tmp_path):
    proc = kdexp("train", "-m", *FAST, "method=gkd", "method.lmbda=0,0.5,1.5", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "method.lmbda must be in [0, 1], got 1.5" in proc.stderr, proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path):
    yield
    if (tmp_path / "ro").is_mount():
        subprocess.run(["umount", str(tmp_path / "ro")], check=False)
    shutil.rmtree(tmp_path / "ro", ignore_errors=True)
