"""Fixtures of the unit tests that need a method's context on the tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from kdexp.data import load_examples
from kdexp.methods import Context
from kdexp.models import load_model
from kdexp.teachers import LiveTeacher


@pytest.fixture(scope="module")
def ctx_parts(teacher_available):
    from hydra import compose, initialize_config_dir

    from kdexp.config import conf_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="test"):
        cfg = compose("config", overrides=["logger=none", "data.toy.n_train=24", "data.toy.n_valid=4",
                                           "data.toy.n_test=4", "rollout.max_new_tokens=12"])
    torch.manual_seed(0)
    student, tok = load_model(OmegaConf.to_container(cfg.student, resolve=True))
    teacher, _ = load_model(OmegaConf.to_container(cfg.teacher, resolve=True), "teacher")
    teacher.eval()
    data = load_examples(cfg.data, tok)
    return cfg, student, teacher, tok, data


@pytest.fixture
def ctx(ctx_parts, tmp_path):
    cfg, student, teacher, tok, data = ctx_parts
    cfg = copy.deepcopy(cfg)
    cfg.rollout.cache_dir = str(tmp_path / "cache")
    accelerator = Accelerator(cpu=True)
    return Context(cfg, accelerator, student, LiveTeacher(accelerator, None, teacher), tok, data["train"],
                   max_steps=10)
