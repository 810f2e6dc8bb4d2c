"""The checks of a training run made before any model is loaded: the config (values, the
method's parameters, combinations), the run directory (a second run, a resume), the
tokenizers, the data, the evaluation sets and the teacher cache; every problem at once.

This module imports no torch: :func:`declared_problems` is what the command line runs first,
and the heavier checks import what they need when they run."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict

from kdexp import config, methods
from kdexp.errors import Problems, UserError

if TYPE_CHECKING:
    from kdexp.teacher_cache import TeacherCache

log = logging.getLogger(__name__)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def requeued() -> bool:
    """Whether SLURM restarted this job (preemption, time-out, ``scontrol requeue``)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to start a second run in a directory that already holds one (unless resuming).

    A job that SLURM requeued continues from its last checkpoint as if ``train.resume=true``
    was given (same run directory, same W&B run), or starts over if it died before its first.
    """
    from kdexp import checkpoint

    if requeued() and not cfg.train.resume:
        has_checkpoint = bool(checkpoint.list_checkpoints(run_dir))
        log.info("requeued by SLURM (restart %s): %s", os.environ["SLURM_RESTART_COUNT"],
                 "resuming from the last checkpoint" if has_checkpoint else "no checkpoint yet, starting over")
        if has_checkpoint:
            with open_dict(cfg):
                cfg.train.resume = True
        elif int(os.environ.get("RANK") or 0) == 0:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (run_dir / "config.yaml").unlink(missing_ok=True)
    if cfg.train.resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise UserError(f"train.resume=true but {run_dir} has no checkpoint; "
                            f"point hydra.run.dir at the run to continue")
        saved = _leaves(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
        now = _leaves(OmegaConf.to_container(cfg, resolve=True))
        changed = sorted(k for k in saved.keys() | now.keys()
                         if not k.startswith(("train.resume", "logger.")) and saved.get(k) != now.get(k))
        if changed:
            raise UserError(f"train.resume=true with a different config than the run in {run_dir}: "
                            f"{', '.join(changed[:5])}; resume with the original overrides")
    elif (run_dir / "config.yaml").exists() and int(os.environ.get("RANK") or 0) == 0:
        # Only the first process asks: it writes config.yaml once the run starts, and another
        # process may look after that.
        raise UserError(f"{run_dir} already holds a run; continue it with train.resume=true, "
                        f"or choose another hydra.run.dir")



def declared_problems(cfg: DictConfig, world: int = 1) -> list[str]:
    """The problems of a training config found from the declarations alone, without importing
    torch: the run's settings (:data:`kdexp.config.SETTINGS`), the method's parameters (its
    record in :data:`kdexp.methods.METHODS`), the divergence's (:mod:`kdexp.losses.catalog`),
    the batch arithmetic and the names of the evaluation sets."""
    from kdexp.errors import unknown_choice
    from kdexp.losses import catalog

    problems = Problems(config.problems(cfg))
    with problems.check():
        for line in methods.METHODS.get(cfg.method.name).problems(cfg):
            problems.add(line)
    loss = OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") is not None else {}
    name = loss.pop("name", None)
    if name in catalog.DECLARED:
        options = [option.problem(loss.pop(option.name), f"loss.{option.name}")
                   for option in catalog.TERM_OPTIONS if option.name in loss]
        for line in [p for p in options if p] + catalog.problems(name, loss):
            problems.add(line)
    elif name is not None:
        problems.add(str(unknown_choice("loss option", name, catalog.names())))
    t = cfg.train
    if all(isinstance(v, int) and v > 0 for v in (t.batch_size, t.micro_batch_size)):
        accum, rest = divmod(t.batch_size, t.micro_batch_size * world)
        if rest or accum == 0:
            problems.add(f"train.batch_size ({t.batch_size}) must be a multiple of "
                         f"train.micro_batch_size ({t.micro_batch_size}) x {world} processes")
    for set_name in cfg.eval.get("sets") or []:
        if set_name != cfg.data.name and set_name not in config.group_choices("data"):
            problems.add(str(unknown_choice("eval.sets entry", set_name, config.group_choices("data"))))
    return list(problems)


def check_config(cfg: DictConfig, world: int = 1) -> tuple[Problems, methods.Plan | None]:
    """Every problem of a training config found without loading anything: the declared ones
    (:func:`declared_problems`), then those of the method's plan (its terms, its sources) and
    of combinations that make no sense. ``(problems, plan)``."""
    problems = Problems(declared_problems(cfg, world))
    plan = None
    if not any(line.startswith(("method", "loss", "unknown")) for line in problems):
        with problems.check(consequences=True):
            plan = methods.build(cfg)
    if plan is None:
        return problems, plan
    if plan.objective.sample_weight != "none" and cfg.get("deepspeed"):
        problems.add(f"method.sample_weight={plan.objective.sample_weight} is normalized over the optimizer "
                     f"step by rescaling the accumulated gradients, which DeepSpeed's fused step does not "
                     f"allow: train it without deepspeed= (DDP or one process)")
    from kdexp import rollout_vllm

    for line in [*fsdp_problems(cfg), *rollout_vllm.problems(cfg), *cross_tokenizer_problems(cfg, plan),
                 *sampled_problems(cfg, plan)]:
        problems.add(line)
    source = cfg.teacher.get("source")
    from_cache = source == "cache"
    several = bool(config.teachers_rule(cfg))
    if several:
        from kdexp.teachers.multi import check_names

        for line in check_names(cfg.teachers.names, cfg.teachers.rule, config.group_choices("teacher")):
            problems.add(line)
        weights = cfg.teachers.get("weights")
        if cfg.teachers.rule == "mixture" and weights is not None and len(weights) != len(cfg.teachers.names or []):
            problems.add(f"teachers.weights has {len(weights)} weights for {len(cfg.teachers.names or [])} teachers")
        for line in mot_problems(cfg) if cfg.teachers.rule == "mot" else []:
            problems.add(line)
        if not plan.needs_teacher:
            problems.add(f"teachers.rule={cfg.teachers.rule} combines teachers for the loss, but method="
                         f"{cfg.method.name} reads no teacher: drop teachers.rule")
    cached_member = several and any(config.is_cached(n) for n in (cfg.teachers.get("names") or []))
    if (from_cache or cached_member) and (plan.online is not None or type(plan.source) is not methods.Source
                                          or any(c.needs_teacher for c in plan.hooks)):
        which, fix = (("teacher.source=cache", "use teacher.source=live") if from_cache else
                      ("a cache: entry of teachers.names", "name the live teacher instead"))
        problems.add(f"{which} serves methods that train on the dataset text (sft, kd, taid, ...); "
                     f"method={cfg.method.name} generates or trains sequences the cache cannot hold: {fix}")
    elif source == "server" and (plan.online is not None or any(c.needs_teacher and not c.teacher_generates_only
                                                                 for c in plan.components)):
        problems.add(f"teacher.source=server scores text and generates teacher outputs; method={cfg.method.name} "
                     f"also trains the teacher or samples from it while rolling out the student (a teacher "
                     f"mix, teacher-scored rewards), which needs teacher.source=live")
    elif several and (source != "live" or plan.online is not None or any(c.needs_teacher for c in plan.components)):
        problems.add(f"teachers.rule={cfg.teachers.rule} combines live teachers' distributions on the training "
                     f"text; method={cfg.method.name} with teacher.source={source} also trains, generates with or "
                     f"samples from the teacher: use one teacher (teachers.rule=null) for it")
    elif plan.needs_teacher and source == "live" and not several and not cfg.teacher.get("name_or_path"):
        problems.add(f"method={cfg.method.name} needs a teacher; choose one with teacher=NAME")
    return problems, plan


def sampled_problems(cfg: DictConfig, plan) -> list[str]:
    """``teacher.sparse=sampled``: read from a cache or a server, by divergences it estimates
    without bias, at one temperature."""
    if cfg.teacher.get("sparse", "topk") != "sampled":
        return []
    if cfg.teacher.get("source") not in ("cache", "server") or config.teachers_rule(cfg):
        return ["teacher.sparse=sampled reads draws from one teacher's cache (teacher.source=cache, built by kdexp "
                "cache-teacher teacher.sparse=sampled) or server (teacher.source=server, kdexp serve-teacher), "
                "teachers.rule=null; a live teacher gives its whole distribution"]
    from kdexp.losses import sampled

    lines = sampled.problems([t.name for t in plan.objective.terms if t.needs_teacher])
    if len(plan.objective.teacher_temperatures) > 1:
        lines.append("teacher.sparse=sampled draws from the teacher at one temperature, but the objective reads it "
                     f"at {sorted(plan.objective.teacher_temperatures)}: use one temperature for every term")
    if plan.objective.sample_weight == "teacher_likelihood":
        lines.append("method.sample_weight=teacher_likelihood needs the teacher's probability of every target "
                     "token, which draws do not hold: use teacher.sparse=topk or student_likelihood")
    return lines


def cross_tokenizer_problems(cfg: DictConfig, plan) -> list[str]:
    """``loss.cross_tokenizer``: what a teacher compared through text does not serve yet."""
    approach = cfg.loss.get("cross_tokenizer")
    if not approach:
        return []
    what = f"loss.cross_tokenizer={approach}"
    if cfg.teacher.get("source") not in ("live", "server") or config.teachers_rule(cfg):
        return [f"{what} works with one live or served teacher (teacher.source=live or server, teachers.rule=null): "
                f"a cache holds a teacher's distributions on the student's tokens, which another tokenizer does not "
                f"have, and several teachers are not aligned across tokenizers yet"]
    if cfg.teacher.get("source") == "server" and cfg.teacher.get("sparse", "topk") != "topk":
        return [f"{what} with a served teacher reads its top-k log-probabilities: teacher.sparse=sampled is not "
                f"aligned across tokenizers"]
    problems = []
    if plan.online is not None or any(c.needs_teacher for c in plan.components):
        problems.append(f"{what}: method={cfg.method.name} trains, generates with or samples from the teacher, "
                        f"which needs one tokenizer; methods that read the teacher's distributions on the "
                        f"student's sequences (kd, gkd with seq_kd=false, imitkd, distillm, ...) work")
    for term in plan.objective.terms:
        if term.needs_teacher and term.cross is None:
            problems.append(f"{what}: the term '{term.name}' reads the teacher's logits token by token, which needs "
                            f"one tokenizer; only divergence terms are compared across tokenizers")
    if plan.objective.sample_weight == "teacher_likelihood":
        problems.append(f"{what}: method.sample_weight=teacher_likelihood scores the student's tokens with the "
                        f"teacher: use student_likelihood or none")
    return problems


def fsdp_problems(cfg: DictConfig) -> list[str]:
    """``fsdp=``: the combinations the FSDP2 engine does not run."""
    if cfg.get("fsdp") is None:
        return []
    problems = []
    if cfg.get("deepspeed") is not None:
        problems.append("fsdp= and deepspeed= are two engines: choose one (write ~deepspeed or ~fsdp to drop the other)")
    if cfg.train.mixed_precision == "fp16":
        problems.append("fsdp= trains in float32 or bf16 (train.mixed_precision=bf16); fp16's loss scaling over "
                        "sharded gradients is not supported: use bf16, or deepspeed= for fp16")
    if cfg.student.get("lora", {}).get("enabled"):
        problems.append("fsdp= with a LoRA student is not supported yet (the final merge needs the whole model): "
                        "train LoRA without fsdp= (DDP or deepspeed=)")
    return problems


def mot_problems(cfg: DictConfig) -> list[str]:
    """``teachers.rule=mot``: it edits the student's weights and the optimizer's state between
    branches, so it needs them whole, and a step count that ends a round."""
    from kdexp.teachers.merge import mot_steps_problem

    t = cfg.train
    problems = []
    if cfg.get("deepspeed") or cfg.get("fsdp"):
        engine = "deepspeed=" if cfg.get("deepspeed") else "fsdp="
        problems.append(f"teachers.rule=mot resets the student's weights and optimizer state between branches, "
                        f"which {engine} partitions: train it without {engine} (DDP or one process)")
    if cfg.student.get("lora", {}).get("enabled"):
        problems.append("teachers.rule=mot averages whole weights; averaging LoRA's factors is not averaging "
                        "the adapted weights: train it with student.lora.enabled=false")
    n, r = len(cfg.teachers.names or []), cfg.teachers.branch_steps
    if n and isinstance(r, int) and r > 0 and t.get("epochs") is None and t.max_steps % (n * r):
        problems.append(mot_steps_problem(t.max_steps, n, cfg.teachers.branch_steps))
    return problems


def eval_sets(cfg: DictConfig, problems: Problems, read: bool = False) -> dict[str, DictConfig]:
    """The configs of ``eval.sets`` (the final evaluation's data sets), each problem recorded;
    ``read``: also read each set's test records, so a missing file stops the run before training
    rather than after it."""
    from kdexp import jobs

    sets: dict[str, DictConfig] = {}
    for name in cfg.eval.get("sets") or []:
        with problems.check():
            sets[name] = jobs.eval_set(cfg, name)
            if read:
                try:
                    from kdexp.data.sources import load_test_split

                    load_test_split(OmegaConf.to_container(sets[name].data))
                except UserError as err:
                    raise UserError(f"evaluation set {name} (eval.sets): {err}; MiniLLM's processed "
                                    f"sets are read under eval.data_dir") from None
    return sets


def check_routes(cfg: DictConfig, train: list) -> None:
    """``teachers.rule=route``: every training example's ``route_key`` field names a teacher."""
    key, names = cfg.teachers.route_key, [str(n) for n in cfg.teachers.names]
    mapping = {str(k): str(v) for k, v in (cfg.teachers.route_map or {}).items()}
    missing = sum(key not in e.record for e in train)
    if missing:
        fields = ", ".join(sorted(train[0].record)) if train else "none"
        raise UserError(f"teachers.rule=route reads each example's {key!r} field (teachers.route_key), but {missing} "
                        f"of {len(train)} training examples lack it (their fields: {fields})")
    default = cfg.teachers.get("route_default")
    unknown = [] if default else sorted({str(e.record[key]) for e in train} - set(names) - set(mapping))
    if unknown:
        raise UserError(f"training examples name teachers that teachers.names lacks ({key}={', '.join(unknown)}): "
                        f"add them to teachers.names or map them with teachers.route_map (or teachers.route_default: the rest)")
    bad = sorted({str(v) for v in [*mapping.values(), *([default] if default else [])]} - set(names))
    if bad:
        raise UserError(f"teachers.route_map maps to {', '.join(bad)}, not in teachers.names ({', '.join(names)})")


class Inputs(NamedTuple):
    plan: methods.Plan
    tokenizer: Any
    data: dict[str, list]
    teacher_tokenizer: Any  # None: not needed, or from the cache
    cache: TeacherCache | None
    server: Any = None  # teacher.source=server: the checked client (kdexp.teachers.server)
    named_tokenizers: Any = None  # teachers.rule: {name: tokenizer} of teachers.names (and the raw student)
    named_servers: Any = None  # teachers.rule: {url: checked client} of the served teachers.names
    named_caches: Any = None  # teachers.rule: {"cache:NAME": opened cache} of the cached teachers.names


def prepare_inputs(cfg: DictConfig, run_dir: Path, world: int) -> Inputs:
    """Check the config, the run directory, the tokenizers, the data and the teacher cache
    before any model is loaded; every problem at once."""
    from kdexp import teacher_cache
    from kdexp.data import load_examples
    from kdexp.models import load_tokenizer, same_tokenizer
    from kdexp.step import BatchStream

    problems, plan = check_config(cfg, world)
    with problems.check():
        check_run_dir(cfg, run_dir)
    tokenizer = teacher_tok = data = cache = None
    with problems.check(consequences=True):
        tokenizer = load_tokenizer(cfg.student, "student")
    wants_teacher = plan is not None and (plan.needs_teacher or cfg.eval.teacher)
    rule = config.teachers_rule(cfg)
    named_tokenizers, named_servers = {}, {}
    if plan is not None and rule and not problems:  # the named teachers (and the raw student), not teacher=
        from kdexp.teachers import preset
        from kdexp.teachers.server import connect

        t = cfg.teachers
        for url in dict.fromkeys(str(n) for n in t.names if config.is_url(n)):  # a name given twice: checked once
            with problems.check(consequences=True):
                if tokenizer is not None:
                    named_servers[url] = connect(cfg, tokenizer, url)
        named = {str(n): f"teachers.names: {n}" for n in t.names if not config.is_url(n) and not config.is_cached(n)}
        if t.rule == "relative" and t.get("raw_student"):
            named.setdefault(str(t.raw_student), "teachers.raw_student")
        for name, what in named.items():
            with problems.check(consequences=True):
                spec = preset(name)
                named_tokenizers[name] = load_tokenizer(spec, "teacher")
                if tokenizer is not None:
                    same_tokenizer(tokenizer, named_tokenizers[name],
                                   (cfg.student.name_or_path, f"{spec.name_or_path} ({what})"))
    elif wants_teacher and cfg.teacher.get("name_or_path") and (
            cfg.teacher.source == "live" or (cfg.teacher.source == "server" and cfg.loss.get("cross_tokenizer"))):
        # a served teacher with another tokenizer: teacher= names its tokenizer (the server's model's)
        with problems.check(consequences=True):
            teacher_tok = load_tokenizer(cfg.teacher, "teacher")
            if tokenizer is not None and cfg.loss.get("cross_tokenizer"):
                from kdexp.teachers.cross import lossless_problems

                for line in lossless_problems(tokenizer, teacher_tok):
                    problems.add(line)
            elif tokenizer is not None:
                same_tokenizer(tokenizer, teacher_tok, (cfg.student.name_or_path, cfg.teacher.name_or_path))
    if tokenizer is not None:
        with problems.check(consequences=True):
            data = load_examples(cfg.data, tokenizer)
            BatchStream.check(len(data["train"]), cfg.train.micro_batch_size, world)
    eval_sets(cfg, problems, read=True)
    if data is not None and cfg.teacher.source == "cache" and not problems:
        with problems.check():
            cache = teacher_cache.open_cache(cfg, data["train"], tokenizer,
                                             teacher_cache.temperature_of(plan.objective.teacher_temperatures))
    named_caches = {}
    if data is not None and rule and not problems:
        for name in dict.fromkeys(str(n) for n in cfg.teachers.names if config.is_cached(n)):
            with problems.check():
                named_caches[name] = open_named_cache(cfg, name, data["train"], tokenizer)
    if data is not None and rule == "route" and not problems:
        with problems.check():
            check_routes(cfg, data["train"])
    server = None
    if tokenizer is not None and cfg.teacher.source == "server" and not problems:
        from kdexp.teachers.server import connect

        with problems.check():
            # across tokenizers the server's model tokenizes as the teacher's tokenizer, not the student's
            server = connect(cfg, teacher_tok if cfg.loss.get("cross_tokenizer") and teacher_tok is not None else tokenizer)
    problems.raise_if_any()
    return Inputs(plan, tokenizer, data, teacher_tok, cache, server, named_tokenizers, named_servers, named_caches)


def open_named_cache(cfg: DictConfig, name: str, train: list, tokenizer) -> Any:
    """The top-k cache of the teacher ``cache:NAME`` names (a preset or a model directory), as
    ``kdexp cache-teacher teacher=NAME loss.temperature=1`` built it: the rules combine the
    teachers' distributions at temperature 1 (the loss tempers the result)."""
    from kdexp import teacher_cache
    from kdexp.teachers import preset

    spec = preset(name.removeprefix("cache:"))
    teacher = OmegaConf.merge(cfg.teacher, {k: spec[k] for k in ("name_or_path", "revision", "dtype")})
    scoped = OmegaConf.merge(cfg, {"teacher": teacher})
    scoped.teacher.cache = None  # teacher.cache names the one teacher's cache
    try:
        return teacher_cache.open_cache(scoped, train, tokenizer, 1.0)
    except UserError as err:
        if "no teacher cache" not in str(err):
            raise
        raise UserError(f"teachers.names entry {name}: no cache of that teacher at temperature 1 with "
                        f"top-{scoped.teacher.top_k}; build it with the run's data overrides: kdexp cache-teacher "
                        f"teacher={name.removeprefix('cache:')} loss.temperature=1 "
                        f"teacher.top_k={scoped.teacher.top_k}") from None


