"""benchmarks/bench_agreement.py runs end to end and reports what docs/performance.md quotes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_agreement(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_agreement

    yield bench_agreement
    sys.modules.pop("bench_agreement", None)


def test_matching_helpers(bench_agreement):
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = a.copy()
    b[2, 0] = True  # IoU 8 / 9 with a
    c = np.zeros((4, 4), bool)
    c[3, 3] = True
    best = bench_agreement.best_ious([a, c], [b])
    assert best == pytest.approx([8 / 9, 0.0])
    assert bench_agreement._matched(best, at=0.85) == 1
    assert bench_agreement._matched(best) == 0  # 8 / 9 < MATCH_IOU = 0.9
    assert bench_agreement._unmatched(best) == {"no_partner": 1, "different_mask": 1}
    assert bench_agreement.best_ious([a], []) == [0.0]


def test_agreement_report_on_the_demo_model(bench_agreement, tmp_path):
    out = tmp_path / "agreement.json"
    argv = ["--model", "demo", "--images", "1", "--size", "96", "--points-per-side", "8"]
    report = bench_agreement.main([*argv, "--max-objects", "2", "--noise-floor", "--out", str(out)])
    assert json.loads(out.read_text())["images"] == 1
    assert report["objects_prompted"] >= 1
    assert 0.0 < report["click_mean_iou"] <= 1.0 and 0.0 < report["box_mean_iou"] <= 1.0
    fractions = [
        report["automatic_exact_matched_in_auto"],
        report["auto_encoded_exact_decoded"]["exact_matched_in_it"],
        report["noise_floor"]["exact_matched_in_noisy"],
    ]
    assert all(f is None or 0.0 <= f <= 1.0 for f in fractions)
    unmatched = report["automatic_unmatched"]["exact_objects"]
    n_exact = report["automatic_objects"]["exact"]
    matched = round((report["automatic_exact_matched_in_auto"] or 0.0) * n_exact)
    assert matched + unmatched["no_partner"] + unmatched["different_mask"] == n_exact
    if report["auto_resolves_to"] == "fp32":  # no fast bf16 here: auto is exact
        assert report["embedding_relative_deviation_mean"] == 0.0
        assert report["click_mean_iou"] == report["box_mean_iou"] == 1.0
    else:
        assert 0.0 < report["embedding_relative_deviation_mean"] < 0.05
