# kdexp: `make help` lists the targets.
PYTHON ?= python
.DEFAULT_GOAL := help

.PHONY: help install demo test test-fast lint bench gpu-check figures reproduce readme-check known teacher teachers-study cross-study sparse-study osd-study routing-study clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'

install: ## install kdexp with the dev extras (CPU torch first: no CUDA download)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

demo: ## the embedded default: distill the tiny teacher into the tiny student on the toy task
	kdexp train

test: ## the whole test suite (unit, config composition, CLI smoke)
	$(PYTHON) -m pytest

test-fast: ## unit and config tests only (no end-to-end runs)
	$(PYTHON) -m pytest -m "not slow"

lint: ## ruff
	ruff check kdexp tests

bench: ## benchmarks (about 50 minutes on 2 cores): divergences, throughput, GPT-2 shapes, TRL's two trainers, teacher cache, served teacher, fused paths
	$(PYTHON) benchmarks/divergences.py
	$(PYTHON) benchmarks/throughput.py
	$(PYTHON) benchmarks/throughput.py --shape gpt2 --steps 15 --batch 8 --rounds 1 --methods sft kd "kd (teacher cache)"
	$(PYTHON) benchmarks/trl_gkd.py --profile
	$(PYTHON) benchmarks/trl_gkd.py --trainer distillation --profile
	$(PYTHON) benchmarks/teacher_cache.py
	$(PYTHON) benchmarks/served_teacher.py
	$(PYTHON) benchmarks/fused.py
	$(PYTHON) benchmarks/fused_step.py --shapes gpt2

gpu-check: ## on a lent GPU, one call under 9 minutes: every method in bf16, fused vs plain memory, TRL, rollouts, sampling profile (scripts/gpu_wheels.sh)
	$(PYTHON) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT),)

figures: ## the figures of docs/evaluation.md: train sft / kd-fkl / kd-rkl, run every analysis (about 10 minutes)
	bash scripts/evaluation_figures.sh

reproduce: ## the README's default-run table checked, then the reproduction study: every method, loss and weighting, 3 seeds (docs/results/REPRODUCTION.md; QUICK=1: 1 seed)
	$(PYTHON) scripts/readme_check.py
	$(PYTHON) scripts/reproduce.py $(if $(QUICK),--quick,)

readme-check: ## run `kdexp train` and check that the README quotes the table it prints (WRITE=1: update the README)
	$(PYTHON) scripts/readme_check.py $(if $(WRITE),--write,)

known: ## the known-answer study: claims checked where the truth is known, 3 seeds (docs/results/KNOWN_ANSWERS.md; QUICK=1: 1 seed)
	$(PYTHON) -m kdexp.known.study $(if $(QUICK),--quick,)

teacher: ## rebuild the bundled tokenizers, the tiny teacher, its two specialists and the other-tokenizer teacher from their seed (about 95 minutes on 2 cores)
	$(PYTHON) -m kdexp.assets.build teacher

teachers-study: ## several teachers on the embedded task: each teacher, route, mixture, relative, mot, 3 seeds (docs/results/TEACHERS.md, about 35 minutes)
	$(PYTHON) scripts/teachers_study.py

cross-study: ## distillation across tokenizers: uld and span against sft and the same-tokenizer teacher, 3 seeds (docs/results/CROSS_TOKENIZER.md, about 37 minutes)
	$(PYTHON) scripts/cross_study.py

osd-study: ## online speculative decoding on a drifting stream: a stale draft static and online, an offline one, 3 seeds (docs/results/OSD.md, about 13 minutes)
	$(PYTHON) scripts/osd_study.py

routing-study: ## MoE students' routing: an SFT and a KD tiny-moe student, reference vs own prefixes, 3 seeds (docs/results/ROUTING.md, about 6 minutes)
	$(PYTHON) scripts/routing_study.py

sparse-study: ## sparse teacher targets: dense, top-16/64 caches and sampled caches of 4/12/32 draws, 3 seeds, calibration (docs/results/SPARSE_TEACHER.md, about 15 minutes)
	$(PYTHON) scripts/sparse_study.py

clean: ## remove run directories and caches
	rm -rf runs multirun outputs .pytest_cache .ruff_cache .kdexp-cache
