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
    text = cross_study.report(tmp_path, [0, 1], 60.0)
    span = list(cross_study.ARMS).index("span")
    plain = list(cross_study.ARMS).index("kd-same-plain")
    ratio = (span + 1) / (plain + 1)
    assert f"| {cross_study.ARMS['span'][0]} | {41 + span:.1f} ± 1.4 | " in text
    assert f"| {0.1 * (span + 1):.3f} | {ratio:.2f} |" in text
    assert "| sft | 41.0 ± 1.4 |" in text
