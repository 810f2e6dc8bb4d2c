"""The checks of a command's overrides before Hydra runs anything (:func:`preflight`).

The config is composed once with Hydra's compose API, the key overrides are applied to it as
Hydra applies them, and every problem is reported at once, one line each, before anything is
written: group options and keys (with "did you mean"), every value against its declaration
(:func:`kdexp.checks.declared_problems`, without importing torch), then, for ``train``, the
method's plan (:func:`kdexp.checks.check_config`), the output directory and an existing run.
The command line (:mod:`kdexp.cli`) and :func:`kdexp.api.run` both call it.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdexp.errors import Problems, UserError, did_you_mean, unknown_choice

# The config sections each command checks (None: all of them).
CHECKED: dict[str, list[str] | None] = {"train": None, "eval": ["data", "eval"], "generate": ["data", "eval"],
                                        "analyze": ["data", "analyze"], "compare": [],
                                        "cache-teacher": ["teacher", "data", "rollout"],
                                        "serve-teacher": ["teacher", "serve"], "osd": ["data", "osd"]}
# Hydra's own flags that take a value: the value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion"}


def _split_args(args: list[str]) -> tuple[list[str], bool]:
    """The overrides among ``args`` (Hydra's flags and their values removed), and multirun."""
    overrides, skip, multirun = [], False, False
    for a in args:
        if skip:
            skip = False
        elif a in _FLAGS_WITH_VALUE:
            skip = True
        elif a in ("-m", "--multirun"):
            multirun = True
        elif not a.startswith("-"):
            overrides.append(a)
    return overrides, multirun


def preflight(args: list[str], checked: list[str] | None = None) -> set[str]:
    """Check group options, keys, values (of the sections ``checked``; ``None``: all) and the
    output directory before Hydra runs anything. The config is composed once (Hydra's compose
    API), the key overrides are applied to it as Hydra applies them, and every problem is
    reported at once; nothing is written. Returns the run directories that existed before the
    command (never removed by it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from kdexp.config import all_groups, conf_dir, flat_keys, group_choices, writable_dir_problem

    overrides, multirun = _split_args(args)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UserError(f"cannot parse the overrides: {str(err).splitlines()[0]}") from None
    groups = set(all_groups())
    group_overrides, key_overrides, problems, bad_groups = [], [], Problems(), set()
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            group_overrides.append(o.input_line)
        elif key in groups:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            if None in values:  # Hydra takes no null for a group: it removes one with ~GROUP
                fix = (f"choose {key}=none" if "none" in group_choices(key) else
                       f"write ~{key} to remove it (kdexp train experiment=gpt2_base '~deepspeed')")
                problems.add(f"{key}=null is not an option of {key}; {fix}")
                bad_groups.add(key)
                continue
            bad = [v for v in values if str(v) not in group_choices(key)]
            if bad:  # its keys are not checked: they belong to the option meant
                problems.add(str(unknown_choice(f"{key} option", bad[0], group_choices(key))))
                bad_groups.add(key)
                continue
            first = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.value()
            group_overrides.append(f"{'+' if o.is_add() else ''}{key}={first}")
        else:
            key_overrides.append(o)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="preflight"):
        try:
            cfg = compose("config", overrides=group_overrides, return_hydra_config=True)
        except HydraException as err:
            if "submitit" in str(err):
                raise UserError("hydra/launcher=slurm needs hydra-submitit-launcher: "
                                "pip install 'kdexp[slurm]'") from None
            raise UserError(str(err).splitlines()[0]) from None
    known, valid = set(flat_keys(cfg)), []
    for o in key_overrides:
        if o.key_or_group.split(".")[0] in bad_groups:
            continue
        if not (o.is_add() or o.is_force_add()) and o.key_or_group not in known:
            options = [k for k in known if not k.startswith("hydra")]
            problems.add(f"unknown option '{o.key_or_group}';{did_you_mean(o.key_or_group, options)} "
                         f"(to add a new key, write +{o.input_line})")
        else:
            valid.append(o)
    variants = _with_overrides(cfg, valid)  # [] when Hydra will reject a value with its own message
    for line in _value_problems(variants, checked, light=bool(problems)):
        problems.add(line)
    problems.raise_if_any()
    try:
        out = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    except Exception:  # an interpolation only Hydra's runtime can resolve: Hydra will check
        return set()
    problem = writable_dir_problem(out) if out else None
    if problem:
        raise UserError(problem)
    if checked is None and out and not multirun and variants:
        _check_existing_run(variants[0], Path(out))
    return {str(Path(out).resolve())} if out and Path(out).exists() else set()


def _with_overrides(cfg, key_overrides: list) -> list:
    """``cfg`` with the key overrides applied as Hydra applies them (``OmegaConf.update``, merged;
    ``+key`` added), without the ``hydra`` node: one config with every sweep at its first value,
    then one per other value of each sweep (``a=1,2,3``). ``[]`` if a value does not fit."""
    from omegaconf import OmegaConf, open_dict

    def apply(base, o, value):
        OmegaConf.update(base, o.key_or_group, value, merge=True, force_add=o.is_add() or o.is_force_add())

    try:
        job = cfg.copy()
        with open_dict(job):
            job.pop("hydra", None)
        sweeps = [o for o in key_overrides if o.is_sweep_override()]
        for o in key_overrides:
            apply(job, o, next(iter(o.sweep_iterator())) if o.is_sweep_override() else o.value())
        variants = [job]
        for o in sweeps:
            for value in list(o.sweep_iterator())[1:]:
                one = job.copy()
                apply(one, o, value)
                variants.append(one)
        return variants
    except Exception:
        return []


def _check_existing_run(cfg, run_dir: Path) -> None:
    """``kdexp train`` into a directory that holds a run: refused (or, with train.resume=true,
    checked against the run's config) before Hydra rewrites the run's ``.hydra/`` files; and
    train.resume=true where there is nothing to resume."""
    from kdexp.checks import check_run_dir, requeued

    if requeued():
        return  # the job decides: a requeued job continues its run
    try:
        check_run_dir(cfg, run_dir)
    except UserError:
        raise
    except Exception:  # a value only the job can resolve: the job checks again
        return


def _model_problems(cfg) -> list[str]:
    """``model=``: a missing path or an unreachable hub id, said before anything is imported
    (a preset name is neither)."""
    from kdexp import hub
    from kdexp.config import group_choices

    target = cfg.get("model")
    if not target or str(target) in (*group_choices("teacher"), *group_choices("student")):
        return []
    found = hub.problem(str(target), "model")
    return [found] if found else []


def _value_problems(variants: list, checked: list[str] | None, light: bool = False) -> list[str]:
    """The problems of each composed variant (a sweep's values): :func:`kdexp.config.problems`
    of the sections ``checked``, or for ``train`` (``checked`` None) the declared parameters'
    (:func:`kdexp.checks.declared_problems`, without torch) and, when those find nothing and
    not ``light``, the method's plan (:func:`kdexp.checks.check_config`, which imports torch)."""
    from kdexp.checks import declared_problems
    from kdexp.config import problems

    world = int(os.environ.get("WORLD_SIZE", "1"))
    found: list[str] = []

    def collect(check) -> None:
        for cfg in variants:
            found.extend(p for p in check(cfg) if p not in found)

    try:
        if checked is not None:
            collect(lambda c: problems(c, checked))
            if "eval" in checked:  # eval, generate: the model to load
                collect(_model_problems)
            return found
        collect(lambda c: declared_problems(c, world))
        if not found and not light:
            from kdexp.checks import check_config

            collect(lambda c: list(check_config(c, world)[0]))
        from kdexp import hub  # here, not at the top: the commands that load no model never import it

        collect(hub.config_problems)  # the student and teacher, before the imports
    except UserError as err:
        return found + [line for line in str(err).splitlines() if line not in found]
    except Exception:  # an interpolation only the job can resolve: the job checks again
        return []
    return found
