"""kdexp/hub.py: a name is a path or a hub id; a hub that cannot answer is known at once."""

from __future__ import annotations

import pytest

from kdexp import api, hub
from kdexp.errors import UserError


@pytest.fixture(autouse=True)
def fresh_hub_state(monkeypatch):
    """Each test starts as a new process would: no forced offline mode, no cached answer."""
    from huggingface_hub import constants
    monkeypatch.setattr(hub, "_user_offline", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    hub._host_answers.cache_clear()
    yield
    hub._host_answers.cache_clear()


@pytest.mark.parametrize("name, local", [
    ("gpt2", False), ("Qwen/Qwen2.5-0.5B", False), ("./model", True), ("../runs/x", True), ("/abs/path", True),
    ("~/models/x", True), ("runs/2026-12-04/10-00-00_train", True), ("final/", True), ("a\\b", True),
])
def test_a_path_is_told_from_a_hub_id(name, local):
    assert hub.looks_local(name) is local


def test_an_existing_parent_makes_a_name_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not hub.looks_local("runs/x")
    (tmp_path / "runs").mkdir()
    assert hub.looks_local("runs/x")


def test_a_missing_path_is_an_error_without_the_hub(tmp_path):
    assert hub.problem(str(tmp_path), "student.name_or_path") is None
    found = hub.problem(str(tmp_path / "nope"), "student.name_or_path")
    assert "no such file or directory" in found and "student.name_or_path=" in found


def test_a_closed_endpoint_is_unreachable_and_switches_to_offline(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # the discard port: nothing listens
    assert hub.unreachable()
    found = hub.problem("some-org/some-model-that-is-not-cached", "teacher.name_or_path")
    assert "not in the local cache" in found and "hub is not reachable" in found
    assert constants.HF_HUB_OFFLINE and not hub.offline_requested()


def test_hf_hub_offline_is_honoured_and_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = hub.problem("some-org/some-model-that-is-not-cached", "student.name_or_path")
    assert "HF_HUB_OFFLINE is set" in found and "HF_HUB_OFFLINE=0" in found


def test_train_with_an_unreachable_model_fails_before_loading_anything(tmp_path):
    with pytest.raises(UserError, match="student.name_or_path=openai-community/gpt2: not a local directory"):
        api.run("train", ["student=gpt2", f"hydra.run.dir={tmp_path / 'run'}"], env={"HF_HUB_OFFLINE": "1"})
    assert not (tmp_path / "run").exists()
