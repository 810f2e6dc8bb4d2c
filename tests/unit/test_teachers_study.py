"""scripts/teachers_study.py's report, from hand-written run results (the study itself takes
half an hour): every arm's mean ± std overall and by family, read where `kdexp train` writes them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import teachers_study  # noqa: E402


def test_the_report_reads_every_arm_and_family_from_the_runs(tmp_path):
    for i, arm in enumerate(teachers_study.ARMS):
        for seed in (0, 1):
            score = 50.0 + i + 2 * seed  # mean 51 + i, std sqrt(2)
            families = {f: {"rougeL": score, "exact_match": score / 2} for f in ("fact", "story")}
            run = tmp_path / f"{arm}-seed{seed}"
            run.mkdir()
            (run / "results.json").write_text(json.dumps({"rougeL": score, "exact_match": score / 2,
                                                          "student": {"by_family": families}}))
    text = teachers_study.report(tmp_path, [0, 1], 120.0)
    assert "2 training seeds: 0, 1; 2 minutes" in text
    assert f"| {teachers_study.ARMS['mot'][0]} | 57.0 ± 1.4 | 28.5 ± 0.7 |" in text
    assert "| arm | fact (b) | story (c) |" in text and "| tiny | 51.0 ± 1.4 | 51.0 ± 1.4 |" in text


def test_the_cross_tokenizer_report_reads_scores_and_step_times(tmp_path):
    import cross_study

    for i, arm in enumerate(cross_study.ARMS):
        for seed in (0, 1):
            score = 40.0 + i + 2 * seed
            run = tmp_path / f"{arm}-seed{seed}"
            run.mkdir()
            (run / "results.json").write_text(json.dumps({
                "rougeL": score, "exact_match": score / 2, "train": {"time_s": 100.0 * (i + 1), "steps": 1000},
                "student": {"by_family": {"fact": {"rougeL": score}}}}))
    for i, arm in enumerate(cross_study.TIMED):  # the step times come from the runs timed alone
        run = tmp_path / f"timing-{arm}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"train": {"time_s": 20.0 * (i + 1), "steps": 200}}))
    text = cross_study.report(tmp_path, [0, 1], 60.0)
    span = list(cross_study.ARMS).index("span")
    assert f"| {cross_study.ARMS['span'][0]} | {41 + span:.1f} ± 1.4 | " in text
    assert "| 0.300 | 3.00 |" in text and "| 0.100 | 1.00 |" in text  # span (third timed), kd plain (first)
    assert "| sft (no teacher) | 41.0 ± 1.4 | 20.5 ± 0.7 | - | - |" in text
    assert [j.argv[-1] for j in cross_study.timing_jobs(tmp_path)] == [f"hydra.run.dir={tmp_path / f'timing-{a}'}"
                                                                       for a in cross_study.TIMED]


def test_the_sparse_targets_report_reads_scores_calibration_and_cache_sizes(tmp_path):
    import sparse_study

    arms = list(sparse_study.TARGETS)
    for seed in (0, 1):
        summary = {"teacher": {"ece": 0.5, "mce": 1.0, "accuracy": 97.0}}
        for i, arm in enumerate(arms):
            run = tmp_path / f"{arm}-seed{seed}"
            run.mkdir()
            (run / "results.json").write_text(json.dumps({"rougeL": 60.0 + i + 2 * seed, "exact_match": 20.0 + i}))
            summary[arm] = {"ece": 1.0 + i + seed, "mce": 5.0 + i}
        (tmp_path / f"calibration-seed{seed}").mkdir()
        (tmp_path / f"calibration-seed{seed}" / "calibration.json").write_text(json.dumps({"summary": summary}))
    for arm in arms[1:]:
        (tmp_path / "build" / arm).mkdir(parents=True)
        (tmp_path / "build" / arm / "cache.json").write_text(json.dumps(
            {"bytes_per_token": 60, "positions": 100000, "seconds": 12.3}))
    text = sparse_study.report(tmp_path, [0, 1], 60.0)
    i = arms.index("sampled12")
    assert (f"| {sparse_study.TARGETS['sampled12'][0]} | {61 + i:.1f} ± 1.4 | {20 + i:.1f} ± 0.0 | "
            f"{1.5 + i:.2f} ± 0.71 | {5 + i:.2f} ± 0.00 | 60 | 6.0 | 12 |") in text
    assert "| dense (live teacher) | 61.0 ± 1.4 |" in text and "(the live teacher) | - | - |" in text
    assert "ECE 0.50, MCE 1.00" in text
    builds, runs, analyses = sparse_study.jobs(tmp_path, [0])
    assert len(builds) == 5 and len(runs) == 6 and len(analyses) == 1
    assert all(r.after == (b.done,) for r, b in zip(runs[1:], builds, strict=True)) and runs[0].after == ()
