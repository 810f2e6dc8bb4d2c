"""kdexp.compare on hand-made run directories: swept parameters, seeds, tables, plots, report spec."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest
import yaml
from omegaconf import OmegaConf

from kdexp import compare
from kdexp.errors import UserError


def make_run(root, name, *, lmbda, beta, seed, rouge, method="gkd", overrides=True, curve=(10.0, 20.0)):
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "method": {"name": method, "lmbda": lmbda}, "loss": {"name": "jsd", "beta": beta},
           "logger": {"project": "kdexp", "entity": None, "group": "g"}, "train": {"max_steps": 10}}
    OmegaConf.save(OmegaConf.create(cfg), path / "config.yaml")
    (path / "results.json").write_text(json.dumps({"rougeL": rouge, "exact_match": rouge / 2,
                                                   "train": {"time_s": 3.0}}))
    if overrides:
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"method.lmbda={lmbda}", f"loss.beta={beta}", f"seed={seed}", "+sweep=gkd_lambda_beta",
             f"logger.run_name=r{name}", "hydra.job.name=train"]))
    rows = [{"step": 5, "valid/rougeL": curve[0]}, {"step": 10, "valid/rougeL": curve[1]},
            {"step": 10, "train/loss": 1.0}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "wandb_id.txt").write_text(f"id{name}\n")
    return path


@pytest.fixture
def sweep(tmp_path):
    """A 2 x 2 grid (lmbda x beta) with 2 seeds each: 8 runs."""
    scores = {}
    n = 0
    for lmbda in (0, 1):
        for beta in (0.1, 0.9):
            for seed in (0, 1):
                rouge = 10 * lmbda + 100 * beta + seed
                scores.setdefault((str(lmbda), str(beta)), []).append(rouge)
                make_run(tmp_path / "sweep", str(n), lmbda=lmbda, beta=beta, seed=seed, rouge=rouge)
                n += 1
    return tmp_path / "sweep", scores


def test_rows_group_by_the_swept_values_and_average_over_seeds(sweep):
    root, scores = sweep
    runs = [compare.load_run(p) for p in compare.find_runs([str(root)])]
    assert len(runs) == 8
    params, rows = compare.table(runs, ["rougeL", "exact_match", "time_s"])
    assert params == ["method.lmbda", "loss.beta"]  # seed, logger.*, hydra.* and the shared +sweep are not swept
    assert len(rows) == 4
    for row in rows:
        values = scores[(row["method.lmbda"], row["loss.beta"])]
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        assert row["rougeL"] == pytest.approx(statistics.fmean(values))
        assert row["rougeL_std"] == pytest.approx(statistics.stdev(values))
        assert row["exact_match"] == pytest.approx(statistics.fmean(values) / 2)
        assert row["time_s"] == 3.0 and row["time_s_std"] == 0.0
    best = compare.best_per_method(rows, "rougeL")
    assert list(best) == ["gkd"] and (best["gkd"]["method.lmbda"], best["gkd"]["loss.beta"]) == ("1", "0.9")


def test_without_overrides_the_usual_hyper_parameters_are_compared(tmp_path):
    make_run(tmp_path, "a", lmbda=0.5, beta=0.1, seed=0, rouge=1.0, overrides=False)
    make_run(tmp_path, "b", lmbda=0.5, beta=0.9, seed=0, rouge=2.0, overrides=False, method="kd")
    runs = [compare.load_run(p) for p in compare.find_runs([str(tmp_path / "a"), str(tmp_path / "b")])]
    params, rows = compare.table(runs, ["rougeL"])
    assert params == ["method.name", "loss.beta"]
    assert {r["method"] for r in rows} == {"gkd", "kd"}


def test_tables_in_three_formats(sweep, tmp_path):
    root, _ = sweep
    runs = [compare.load_run(p) for p in compare.find_runs([str(root)])]
    params, rows = compare.table(runs, ["rougeL"])
    md = compare.markdown(params, rows, ["rougeL"], "rougeL")
    assert "| method.lmbda | loss.beta | method | seeds | rougeL |" in md
    assert "Best configuration per method (by rougeL)" in md and "| gkd | 1 | 0.9 |" in md
    parsed = list(csv.DictReader(io.StringIO(compare.to_csv(params, rows, ["rougeL"]))))
    assert len(parsed) == 4 and {r["seeds"] for r in parsed} == {"0 1"}
    assert {float(r["rougeL"]) for r in parsed} == {r["rougeL"] for r in rows}
    page = compare.to_html(params, rows, ["rougeL"], "a <b> title")
    assert "a &lt;b&gt; title" in page and page.count("<tr>") == 5


def test_plots_and_averaged_validation_curves(sweep, tmp_path):
    root, _ = sweep
    runs = [compare.load_run(p) for p in compare.find_runs([str(root)])]
    params, rows = compare.table(runs, ["rougeL", "exact_match"])
    figures = compare.plot_params(params, rows, ["rougeL", "exact_match"], tmp_path)
    assert sorted(f.name for f in figures) == ["compare_loss.beta.png", "compare_method.lmbda.png"]
    curves = compare.plot_curves(params, rows, {str(r.path): r for r in runs}, tmp_path)
    assert curves.read_bytes()[:4] == b"\x89PNG"


def test_report_spec_lists_the_runs_and_the_swept_parameters(sweep):
    root, _ = sweep
    runs = [compare.load_run(p) for p in compare.find_runs([str(root)])]
    params, _ = compare.table(runs, ["rougeL"])
    spec = compare.report_spec(runs, params, "rougeL", "t")
    assert sorted(spec["run_ids"]) == sorted(f"id{i}" for i in range(8))
    assert spec["params"] == params and spec["metric"] == "test/rougeL" and spec["project"] == "kdexp"
    pytest.importorskip("wandb_workspaces")
    report = compare.build_report(spec)  # the objects build; publishing needs W&B online
    assert report.title == "t" and len(report.blocks) == 3


def test_bad_targets_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compare.find_runs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run"):
        compare.find_runs([str(tmp_path / "empty")])


def test_nan_metrics_are_skipped_not_propagated(tmp_path):
    make_run(tmp_path, "a", lmbda=0, beta=0.1, seed=0, rouge=5.0)
    run = compare.load_run(tmp_path / "a")
    run.results.pop("exact_match")
    mean, std = compare._mean_std([run.metric("exact_match")])
    assert math.isnan(mean) and math.isnan(std)


def test_logger_and_launcher_groups_are_not_swept_parameters():
    """`logger=none`, `hydra/launcher=slurm`: how a run is kept, not what it is."""
    for key in ("logger", "logger.project", "hydra/launcher", "hydra.run.dir", "tags", "train.log_every"):
        assert compare.ignored(key), key
    for key in ("loss", "method.lmbda", "train.lr", "loggers_of_mine"):
        assert not compare.ignored(key), key


def test_no_figure_says_why(sweep):
    root, _ = sweep
    runs = [compare.load_run(p) for p in compare.find_runs([str(root)])]
    for r in runs:
        r.curves = []
    assert compare.no_figure_reason(["loss.name"], [{"loss.name": "fkl"}, {"loss.name": "rkl"}], runs) == \
        "no numeric parameter was swept; no run logged validations (train.eval_every)"


def test_one_seed_figures_say_so_and_do_not_magnify_noise(sweep):
    root, _ = sweep
    runs = [compare.load_run(p) for p in compare.find_runs([str(root)])]
    _, rows = compare.table(runs, ["rougeL"])
    assert not compare.one_seed(rows) and "mean ± std" in compare._spread_title(rows, "x")
    _, single = compare.table([r for r in runs if int(r.cfg.seed) == 0], ["rougeL"])
    assert compare.one_seed(single) and "one seed per configuration" in compare._spread_title(single, "x")
    import matplotlib.pyplot as plt

    from kdexp.evaluation import plots
    fig, ax = plt.subplots()
    ax.plot([0, 1], [70.00, 70.15])
    plots.min_span(ax, compare.ONE_SEED_SPAN)
    lo, hi = ax.get_ylim()
    assert hi - lo == pytest.approx(compare.ONE_SEED_SPAN) and lo < 70.0 and hi > 70.15
    ax.set_ylim(0, 100)
    plots.min_span(ax, compare.ONE_SEED_SPAN)  # already wide: unchanged
    assert ax.get_ylim() == (0, 100)
    plt.close(fig)
