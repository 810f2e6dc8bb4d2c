"""``kdexp compare RUN_OR_SWEEP_DIR ...``: one table of final metrics over runs, grouped by what
was swept, averaged over seeds; the best configuration per method; plots; a W&B report.

    kdexp compare multirun/gkd_lambda_beta/2026-11-22/10-00-00        # a whole sweep
    kdexp compare runs/a runs/b runs/c compare.metric=exact_match     # any runs
    kdexp compare multirun/kd_weight/... --wandb-report                # also a W&B report (or its spec)

It works offline from run directories: a run is a directory with ``config.yaml`` and
``results.json`` (what ``kdexp train`` writes); a directory that is not a run is searched for
runs. The swept parameters are the overrides (``.hydra/overrides.yaml``) whose value differs
between runs; without those files, the usual hyper-parameters that differ in the configs. Rows
group the runs that share every swept value but the seed: mean, sample std and count over
seeds. Outputs, in the job's directory: ``compare.md``, ``compare.csv``, ``compare.html``,
``compare.json``, ``compare_PARAM.png`` for every numeric swept parameter (the metric against
it), ``compare_curves.png`` (validation curves), and with ``compare.wandb_report=true``
``wandb_report.json`` (created as a W&B Report when W&B is online).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from kdexp.errors import UserError
from kdexp.evaluation import plots
from kdexp.logging import wandb_mode

# Overrides that say where or how a run is recorded, not what it is: whole groups (logger=none,
# logger.project=..., hydra/launcher=slurm, hydra.run.dir=...) and single keys.
IGNORED_GROUPS = ("hydra", "logger", "tags", "model")
IGNORED = ("train.resume", "train.log_every", "train.save_every", "train.num_threads", "train.device")
# Without overrides files: the hyper-parameters compared when they differ.
KNOWN = ("method.name", "loss.name", "method.lmbda", "loss.beta", "loss.alpha", "loss.temperature",
         "method.kd_weight", "student.name_or_path", "teacher.name_or_path", "data.name", "train.lr",
         "train.max_steps")
SEED = "seed"


def ignored(key: str) -> bool:
    """Whether an override ``key`` records how a run is kept rather than what it is."""
    return re.split(r"[./]", key, maxsplit=1)[0] in IGNORED_GROUPS or key.startswith(IGNORED)


@dataclass
class Run:
    path: Path
    cfg: DictConfig
    results: dict[str, Any]
    overrides: dict[str, str] | None
    curves: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.cfg.method.name)

    def metric(self, name: str) -> float:
        if name == "time_s":
            return float(self.results.get("train", {}).get("time_s", math.nan))
        value = self.results.get(name)
        return float(value) if isinstance(value, (int, float)) else math.nan


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "results.json").is_file()


def find_runs(targets: list[str]) -> list[Path]:
    """Run directories: each target itself, or every run under it."""
    found: list[Path] = []
    for target in targets:
        path = Path(target).expanduser()
        if not path.exists():
            raise UserError(f"compare: {path} does not exist")
        if is_run(path):
            found.append(path)
            continue
        under = sorted(p.parent for p in path.rglob("results.json") if is_run(p.parent))
        if not under:
            raise UserError(f"compare: no run (a directory with config.yaml and results.json) in {path}")
        found += under
    return list(dict.fromkeys(found))


def _overrides(path: Path) -> dict[str, str] | None:
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return None
    out = {}
    for line in yaml.safe_load(file.read_text()) or []:
        key, _, value = str(line).partition("=")
        key = key.lstrip("+~")
        if not ignored(key):
            out[key] = value
    return out


def load_run(path: Path) -> Run:
    curves = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        curves = [row for line in metrics.read_text().splitlines() if line.strip()
                  for row in [json.loads(line)] if any(k.startswith("valid/") for k in row)]
    return Run(path, OmegaConf.load(path / "config.yaml"), json.loads((path / "results.json").read_text()),
               _overrides(path), curves)


def _config_value(cfg: DictConfig, key: str) -> str:
    node = OmegaConf.select(cfg, key, default=None)
    if isinstance(node, DictConfig):  # a group choice (method=gkd): its name
        node = node.get("name", node.get("name_or_path"))
    return "default" if node is None else str(node)


def swept_params(runs: list[Run]) -> tuple[list[str], bool]:
    """The parameters whose values differ between runs (the seed apart), and whether they come
    from the runs' overrides."""
    if all(r.overrides is not None for r in runs):
        keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
        from_overrides = True
    else:
        keys, from_overrides = list(KNOWN), False
    swept = [k for k in keys if k != SEED and len({value(r, k, from_overrides) for r in runs}) > 1]
    return swept, from_overrides


def value(run: Run, key: str, from_overrides: bool) -> str:
    if from_overrides and key in run.overrides:
        return run.overrides[key]
    return _config_value(run.cfg, key)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def table(runs: list[Run], metrics: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of the comparison: one per combination of swept values, aggregated over seeds."""
    params, from_overrides = swept_params(runs)
    groups: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(value(r, k, from_overrides) for k in params)].append(r)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(params, key, strict=True))
        row["method"] = members[0].method
        row["n"] = len(members)
        row["seeds"] = sorted(int(m.cfg.seed) for m in members)
        for name in metrics:
            row[name], row[f"{name}_std"] = _mean_std([m.metric(name) for m in members])
        row["runs"] = [str(m.path) for m in members]
        rows.append(row)
    return params, rows


def best_per_method(rows: list[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        score = row[metric]
        if math.isnan(score):
            continue
        if row["method"] not in best or score > best[row["method"]][metric]:
            best[row["method"]] = row
    return best


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _keys(params: list[str]) -> list[str]:
    """The identifying columns: the swept parameters, and the method unless it was swept."""
    return params if "method" in params else [*params, "method"]


def _cells(row: dict[str, Any], params: list[str], metrics: list[str]) -> list[str]:
    return ([str(row[p]) for p in _keys(params)] + [str(row["n"])]
            + [_fmt(row[m], row[f"{m}_std"]) for m in metrics])


def markdown(params: list[str], rows: list[dict[str, Any]], metrics: list[str], metric: str) -> str:
    head = [*_keys(params), "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(_cells(r, params, metrics)) + " |" for r in rows]
    others = [p for p in params if p != "method"]
    lines += ["", f"Best configuration per method (by {metric}):", "",
              "| method | " + " | ".join(others) + f" | {metric} |", "|---" * (len(others) + 2) + "|"]
    for method, r in best_per_method(rows, metric).items():
        lines.append(f"| {method} | " + " | ".join(str(r[p]) for p in others)
                     + f" | {_fmt(r[metric], r[metric + '_std'])} |")
    return "\n".join(lines)


def to_csv(params: list[str], rows: list[dict[str, Any]], metrics: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*_keys(params), "n", "seeds", *[c for m in metrics for c in (m, f"{m}_std")]])
    for r in rows:
        writer.writerow([*[r[p] for p in _keys(params)], r["n"], " ".join(map(str, r["seeds"])),
                         *[r[c] for m in metrics for c in (m, f"{m}_std")]])
    return out.getvalue()


def to_html(params: list[str], rows: list[dict[str, Any]], metrics: list[str], title: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*_keys(params), "seeds", *metrics])
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, params, metrics))
                     + "</tr>" for r in rows)
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>table{border-collapse:collapse;font-family:sans-serif}td,th{border:1px solid #ccc;"
            f"padding:4px 8px}}</style></head>\n<body><h3>{html.escape(title)}</h3>\n<table><tr>{head}</tr>\n"
            f"{body}\n</table></body></html>\n")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


ONE_SEED_SPAN = 5.0
"""With one seed per configuration there is no spread to draw: the y-axis then spans at least
this many metric points (metrics are percentages), and the figure's title says so."""


def one_seed(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(len(r["runs"]) == 1 for r in rows)


def _spread_title(rows: list[dict[str, Any]], what: str) -> str:
    if one_seed(rows):
        return f"{what}: one seed per configuration, no spread to show (y-axis spans at least {ONE_SEED_SPAN:g})"
    return f"{what}: mean ± std over seeds"


def plot_params(params: list[str], rows: list[dict[str, Any]], metrics: list[str], out: Path) -> list[Path]:
    """For every numeric swept parameter: each metric against it, one line per setting of the
    other swept parameters, a band of one std over seeds. With one seed, the title says there
    is no spread and the y-axis is kept at least :data:`ONE_SEED_SPAN` wide."""
    written = []
    for p in params:
        xs = {r[p] for r in rows}
        if len(xs) < 2 or any(_number(x) is None for x in xs):
            continue
        others = [q for q in params if q != p]
        lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            lines[", ".join(f"{q}={r[q]}" for q in others) or "runs"].append(r)
        fig, axes = plots.figure(1, len(metrics))
        for ax, m in zip(axes, metrics, strict=True):
            for i, (label, members) in enumerate(sorted(lines.items())):
                members = sorted(members, key=lambda r: _number(r[p]))
                plots.curve(ax, [_number(r[p]) for r in members], [r[m] for r in members],
                            [r[f"{m}_std"] for r in members], label, plots.color(i))
            plots.finish(ax, f"{m} against {p}", p, m)
            if one_seed(rows):
                plots.min_span(ax, ONE_SEED_SPAN)
        written.append(plots.save(fig, out / f"compare_{p.replace('/', '_')}.png", _spread_title(rows, "Test metrics")))
    return written


def no_figure_reason(params: list[str], rows: list[dict[str, Any]], runs: list[Run]) -> str:
    """Why ``kdexp compare`` drew nothing."""
    numeric = [p for p in params if len({r[p] for r in rows}) > 1 and all(_number(r[p]) is not None for r in rows)]
    parts = []
    if not numeric:
        parts.append("no numeric parameter was swept" if params else "no parameter differs between the runs")
    if not any(r.curves for r in runs):
        parts.append("no run logged validations (train.eval_every)")
    return "; ".join(parts) or "nothing to draw"


def plot_curves(params: list[str], rows: list[dict[str, Any]], runs: dict[str, Run], out: Path) -> Path | None:
    """Validation curves, averaged over the seeds of each row."""
    keys = sorted({k for r in runs.values() for c in r.curves for k in c if k.startswith("valid/")})
    if not keys:
        return None
    fig, axes = plots.figure(1, len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for i, row in enumerate(rows):
            by_step: dict[int, list[float]] = defaultdict(list)
            for path in row["runs"]:
                for c in runs[path].curves:
                    if key in c:
                        by_step[c["step"]].append(float(c[key]))
            steps = sorted(by_step)
            label = ", ".join(f"{p}={row[p]}" for p in params) or row["method"]
            stats = [_mean_std(by_step[s]) for s in steps]
            plots.curve(ax, steps, [m for m, _ in stats], [s for _, s in stats], label, plots.color(i))
        plots.finish(ax, key, "step", key.split("/", 1)[1])
    return plots.save(fig, out / "compare_curves.png", _spread_title(rows, "Validation during training"))


def report_spec(runs: list[Run], params: list[str], metric: str, title: str) -> dict[str, Any]:
    """What the W&B report shows, as data: written to ``wandb_report.json`` and turned into a
    wandb-workspaces Report by :func:`build_report` when W&B is online."""
    ids = []
    for r in runs:
        file = r.path / "wandb_id.txt"
        if file.is_file():
            ids.append(file.read_text().strip())
    first = runs[0].cfg.logger
    return {"project": first.project, "entity": first.entity, "title": title,
            "description": f"kdexp compare of {len(runs)} runs; swept: {', '.join(params) or 'nothing'}",
            "run_ids": ids, "params": params, "metric": f"test/{metric}",
            "curves": ["valid/rougeL", "valid/exact_match", "valid/loss", "train/loss"]}


def build_report(spec: dict[str, Any]):
    """The W&B Report of a spec (``wandb_workspaces.reports.v2``); ``.save()`` publishes it."""
    import wandb_workspaces.reports.v2 as wr

    ids = ", ".join(repr(i) for i in spec["run_ids"])
    runset = wr.Runset(entity=spec["entity"] or "", project=spec["project"], name="runs",
                       filters=f"Metric('ID') in [{ids}]")
    panels = [wr.LinePlot(title=key, x="Step", y=[key]) for key in spec["curves"]]
    panels += [wr.ScatterPlot(title=f"{spec['metric']} against {p}", x=wr.Config(p), y=wr.SummaryMetric(spec["metric"]))
               for p in spec["params"] if "." in p]
    blocks = [wr.H1(spec["title"]), wr.P(spec["description"]), wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(project=spec["project"], entity=spec["entity"] or "", title=spec["title"],
                     description=spec["description"], blocks=blocks)


def _publish(cfg: DictConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """Create the W&B Report of a spec (needs W&B online and wandb-workspaces)."""
    if wandb_mode(cfg.logger.mode) != "online":
        raise UserError("creating a W&B report needs W&B online: `wandb login` (or WANDB_API_KEY), "
                        "then run this again")
    try:
        report = build_report(spec)
    except ImportError:
        raise UserError("a W&B report needs wandb-workspaces: pip install 'kdexp[report]'") from None
    report.save()
    print(f"W&B report: {report.url}", flush=True)
    return spec


def run_compare(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    c = cfg.compare
    if not c.runs:
        raise UserError("what to compare? kdexp compare RUN_OR_SWEEP_DIR [...]")
    metrics = list(c.metrics)
    if c.metric not in metrics:
        raise UserError(f"compare.metric={c.metric} must be one of compare.metrics ({', '.join(metrics)})")
    if len(c.runs) == 1 and str(c.runs[0]).endswith(".json") and Path(str(c.runs[0])).is_file():
        return _publish(cfg, json.loads(Path(str(c.runs[0])).read_text()))
    runs = [load_run(p) for p in find_runs([str(t) for t in c.runs])]
    params, rows = table(runs, metrics)
    rows.sort(key=lambda r: (r["method"], -r[c.metric] if not math.isnan(r[c.metric]) else math.inf))
    title = c.title or f"kdexp compare: {len(runs)} runs, {len(rows)} configurations"
    md = markdown(params, rows, metrics, c.metric)
    (run_dir / "compare.md").write_text(f"### {title}\n\n{md}\n")
    (run_dir / "compare.csv").write_text(to_csv(params, rows, metrics))
    (run_dir / "compare.html").write_text(to_html(params, rows, metrics, title))
    figures = plot_params(params, rows, metrics, run_dir)
    curves = plot_curves(params, rows, {str(r.path): r for r in runs}, run_dir)
    record = {"title": title, "params": params, "metrics": metrics, "rows": rows,
              "best": best_per_method(rows, c.metric), "figures": [p.name for p in figures]
              + ([curves.name] if curves else [])}
    (run_dir / "compare.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    why = "" if record["figures"] else f" ({no_figure_reason(params, rows, runs)})"
    single = "; one seed per configuration: no spread to show" if one_seed(rows) else ""
    print(f"\n### {title}\n\n{md}\n\nwrote compare.md, .csv, .html, .json and "
          f"{len(record['figures'])} figures{why} to {run_dir}{single}", flush=True)
    if c.wandb_report:
        spec = report_spec(runs, params, c.metric, title)
        (run_dir / "wandb_report.json").write_text(json.dumps(spec, indent=1) + "\n")
        if wandb_mode(cfg.logger.mode) == "online":
            _publish(cfg, spec)
        else:
            print(f"W&B is offline: wrote the report's spec to {run_dir / 'wandb_report.json'}; upload the "
                  f"runs (wandb sync RUN/wandb/offline-run-*) and create it later with "
                  f"`kdexp compare {run_dir / 'wandb_report.json'}` while logged in", flush=True)
    return record
