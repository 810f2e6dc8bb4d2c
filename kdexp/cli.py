"""The ``kdexp`` command: ``kdexp train|eval|generate|analyze [overrides]``, each a Hydra entry point.

    kdexp --help
    kdexp train                                  # the embedded default (about 2 minutes on 2 CPU cores)
    kdexp train method=sft loss=rkl train.max_steps=100 --cfg job
    kdexp eval runs/2026-11-22/10-00-00_train
    kdexp analyze exposure runs/2026-11-22/10-00-00_train
    kdexp train -m loss=fkl,rkl seed=0,1,2

Before Hydra starts, the overrides are checked against ``conf/`` so that an unknown option or
key fails with one line and a "did you mean" instead of a stack trace, and the output
directory is checked for writability. Inside the job, a ``UserError`` prints one line, exits
with status 2, and removes the run directory if the job had not produced anything yet.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from kdexp.errors import Stopped, UserError, unknown_choice
from kdexp.preflight import _FLAGS_WITH_VALUE, CHECKED, preflight  # noqa: F401  (CHECKED: re-exported)

COMMANDS: dict[str, str] = {
    "train": "distill (or fine-tune) a student, then evaluate it on the test split",
    "eval": "evaluate a run, a model directory, a preset or a hub model",
    "generate": "write a model's responses to a split or a prompts file as JSONL",
    "analyze": "analyses of students against their teacher: JSON, PNG and W&B panels",
    "compare": "one table (md, CSV, HTML) and plots of runs or sweeps, grouped by what was swept",
    "cache-teacher": "store the teacher's top-k log-probabilities on the training split (teacher.source=cache)",
    "serve-teacher": "serve the teacher's log-probabilities over HTTP, vLLM's protocol (teacher.source=server)",
    "osd": "online speculative decoding: a draft serves a stream for the teacher, distilled as it serves",
}
# `kdexp analyze NAME`: the analyses (kdexp.analyze.ANALYSES computes them).
ANALYSES: dict[str, str] = {
    "exposure": "exposure bias: per-step error, accumulated regret, AccErr and ExAccErr (Arora et al.)",
    "difficulty": "KL, top-1 agreement and logit std per bucket of teacher uncertainty (Rao et al.)",
    "calibration": "expected calibration error and a reliability diagram of next-token predictions",
    "diversity": "distinct-1..4 and self-BLEU among several samples per prompt",
    "speculative": "acceptance rate of the student as a speculative-decoding draft for the teacher",
    "curves": "per-position KL along the response: reference vs own prefixes",
    "routing": "MoE models: expert agreement between reference and own prefixes, router entropy, load",
}
def fail(message: str, status: int = 2) -> None:
    """Print each line of ``message`` as ``kdexp: error: LINE`` and exit with ``status``."""
    for line in message.splitlines() or [""]:
        print(f"kdexp: error: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def top_help() -> str:
    from kdexp.config import all_groups, group_choices

    lines = ["usage: kdexp {train,eval,generate,cache-teacher,serve-teacher} [GROUP=OPTION ...] [KEY=VALUE ...] "
             "[Hydra flags]",
             "       kdexp analyze NAME [RUN_DIR_OR_MODEL ...] [KEY=VALUE ...]",
             "       kdexp compare RUN_OR_SWEEP_DIR ... [--wandb-report] [KEY=VALUE ...]",
             "       kdexp osd [DRAFT_RUN_OR_MODEL ...] [KEY=VALUE ...]",
             "", "Knowledge distillation experiments for autoregressive language models.", "",
             "commands:"]
    lines += [f"  {name:<15}{text}" for name, text in COMMANDS.items()]
    lines += ["", "analyses (kdexp analyze NAME):"]
    lines += [f"  {name:<12}{text}" for name, text in ANALYSES.items()]
    lines += ["", "config groups (GROUP=OPTION):"]
    for group in all_groups():
        lines.append(f"  {group + '=':<16}{', '.join(group_choices(group))}")
    lines += ["", "Hydra flags: --help (options of a command), --cfg job (print the config), "
              "-m (multirun), hydra.run.dir=DIR", "",
              "examples:", "  kdexp train", "  kdexp train method=sft train.max_steps=200",
              "  kdexp train method=kd loss=rkl student=gpt2 teacher=gpt2-xl data=dolly data.path=dolly.jsonl",
              "  kdexp eval runs/DATE/TIME_train",
              "  kdexp analyze exposure runs/DATE/TIME1_train runs/DATE/TIME2_train analyze.labels=[sft,kd]",
              "  kdexp train -m +sweep=gkd_lambda_beta hydra/launcher=slurm hydra.launcher.partition=gpu",
              "  kdexp train experiment=gpt2_base method=gkd       # a paper's setup (docs/experiments.md)",
              "  kdexp compare multirun/gkd_lambda_beta/DATE/TIME --wandb-report",
              "  kdexp cache-teacher teacher.top_k=64 && kdexp train method=kd teacher.source=cache",
              "  kdexp serve-teacher teacher=tiny serve.port=8000 &   # then, from any job on the node:",
              "  kdexp train method=kd teacher.source=server teacher.url=http://127.0.0.1:8000",
              "  kdexp osd runs/DATE/TIME_train osd.gamma=8 loss=rkl   # online speculative decoding",
              "  kdexp train --help"]
    return "\n".join(lines)


def _job(command: str, existing: set[str]) -> Callable:
    """The Hydra task function of ``command``: one-line errors, no half-written run directory."""

    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from kdexp import api

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            api.job(command, cfg, run_dir, Path(HydraConfig.get().runtime.cwd),
                    str(run_dir.resolve()) in existing)
        except Stopped as err:  # not an error: the run can go on from its checkpoint
            _close_progress_bars()
            print(f"kdexp: {err}", file=sys.stderr, flush=True)
            sys.exit(err.status)
        except UserError as err:
            _close_progress_bars()
            fail(str(err), err.status)

    return task


def _close_progress_bars() -> None:
    """End any progress bar left open by the failed job, so that the message starts a line."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _bare(args: list[str], i: int) -> bool:
    """Whether ``args[i]`` is a positional argument (not an override, a flag or a flag's value)."""
    a = args[i]
    return "=" not in a and not a.startswith("-") and (i == 0 or args[i - 1] not in _FLAGS_WITH_VALUE)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _analyze_args(rest: list[str]) -> list[str]:
    """``NAME [MODEL ...] [overrides]`` -> ``analyze.name=NAME analyze.models=[...] [overrides]``."""
    if not rest or not _bare(rest, 0):
        if any(a in ("-h", "--help") for a in rest):
            print("usage: kdexp analyze NAME [RUN_DIR_OR_MODEL ...] [KEY=VALUE ...]\n\nanalyses:")
            print("\n".join(f"  {name:<12}{text}" for name, text in ANALYSES.items()))
            print("\nkdexp analyze NAME --help: the config (analyze.* keys); docs/evaluation.md: each analysis")
            sys.exit(0)
        fail(f"which analysis? kdexp analyze NAME [RUN_DIR ...] with NAME one of {', '.join(ANALYSES)}")
    if rest[0] not in ANALYSES:
        fail(str(unknown_choice("analysis", rest[0], ANALYSES)))
    flags, overrides = _positional(rest[1:], "analyze.models")
    if not any(o.startswith("hydra.run.dir=") for o in overrides):  # runs/DATE/TIME_analyze-NAME: which one it is
        overrides.append(f"hydra.run.dir=runs/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}_analyze-{rest[0]}")
    return [*flags, f"analyze.name={rest[0]}", *overrides]


def _positional(rest: list[str], key: str) -> tuple[list[str], list[str]]:
    """``(flags, overrides)`` of ``rest``, its positional arguments gathered as ``key=[...]``."""
    values, flags, overrides = [], [], []
    for i in range(len(rest)):
        if _bare(rest, i):
            values.append(rest[i])
        elif "=" in rest[i] and not rest[i].startswith("-") and (i == 0 or rest[i - 1] not in _FLAGS_WITH_VALUE):
            overrides.append(rest[i])
        else:
            flags.append(rest[i])
    if values:
        overrides.insert(0, f"{key}=[{','.join(_quote(v) for v in values)}]")
    return flags, overrides


def command_args(command: str, rest: list[str]) -> list[str]:
    """The Hydra arguments of ``kdexp COMMAND REST``: positional arguments become overrides
    (``kdexp eval RUN_DIR``: the model; ``kdexp analyze NAME RUN ...``; ``kdexp compare DIR ...``)."""
    from kdexp.config import register_resolvers

    register_resolvers()
    rest = list(rest)
    if command in ("eval", "generate") and rest and _bare(rest, 0):
        rest[0] = f"model={rest[0]}"
    if command == "analyze":
        rest = _analyze_args(rest)
    if command == "serve-teacher" and "--api-key" in rest:  # as vllm serve --api-key KEY
        i = rest.index("--api-key")
        if i + 1 >= len(rest) or not rest[i + 1] or rest[i + 1].startswith("-"):
            fail("--api-key needs a value: kdexp serve-teacher --api-key KEY (or set $KDEXP_TEACHER_API_KEY)")
        key = rest[i + 1]
        del rest[i:i + 2]
        env = next((a.split("=", 1)[1] for a in rest if a.startswith("serve.api_key_env=")), "KDEXP_TEACHER_API_KEY")
        import os

        os.environ[env] = key  # read by the job; never an override, so never in the saved config
    if command == "osd":
        flags, overrides = _positional(rest, "osd.drafts")
        rest = [*flags, *overrides]
    if command == "compare":
        wants_report = "--wandb-report" in rest
        flags, overrides = _positional([a for a in rest if a != "--wandb-report"], "compare.runs")
        rest = [*flags, *overrides, *(["compare.wandb_report=true"] if wants_report else [])]
    return rest


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(top_help())
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(str(unknown_choice("command", command, COMMANDS)))
    rest = command_args(command, rest)
    existing: set[str] = set()
    if not any(a in ("--help", "-h", "--hydra-help", "--version", "--info", "-i") for a in rest):
        try:
            existing = preflight(rest, CHECKED[command])
        except UserError as err:
            fail(str(err))
    import hydra

    from kdexp.config import conf_dir

    # Hydra's parser wants the overrides contiguous: put ours next to the user's.
    first = next((i for i, a in enumerate(rest) if "=" in a and not a.startswith("-")
                  and (i == 0 or rest[i - 1] not in _FLAGS_WITH_VALUE)), len(rest))
    sys.argv = [f"kdexp {command}", *rest[:first], f"hydra.job.name={command}", *rest[first:]]
    hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_job(command, existing))()


if __name__ == "__main__":
    main()
