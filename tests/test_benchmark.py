"""benchmarks/paper_digits.py end to end on a few steps, and its statistics by hand."""

import json
import sys

import pytest

from tests.conftest import REPO_ROOT, assert_ok, run_script

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import paper_digits  # noqa: E402


def fake_run(name, seed, rate, fid):
    return paper_digits.Run(name, seed, "pu", metrics={"non_sensitive_rate": rate, "classifier_fid": fid})


def test_summary_means_and_sample_standard_deviations_by_hand():
    runs = [fake_run("pu", 0, 0.9, 4.0), fake_run("pu", 1, 1.0, 6.0), fake_run("unsupervised", 0, 0.8, 5.0)]
    summary = paper_digits.summarize(runs)
    assert list(summary) == ["pu", "unsupervised"]
    assert summary["pu"]["rate_mean"] == pytest.approx(0.95)
    assert summary["pu"]["rate_std"] == pytest.approx(0.0707107, rel=1e-5)  # sqrt(((0.05)^2 * 2) / 1)
    assert summary["pu"]["fid_std"] == pytest.approx(1.4142136, rel=1e-6)
    assert summary["unsupervised"]["rate_std"] == 0.0


def test_welch_t_test_by_hand():
    # means 2 and 5, variances 1 and 1, n = 3 each: t = -3 / sqrt(1/3 + 1/3) = -3.674
    assert paper_digits.welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]).startswith("t = -3.67")
    assert paper_digits.welch_t_test([1.0], [2.0, 3.0]).startswith("n/a")


def test_quick_benchmark_writes_its_table_chart_and_grids(digits_dir, tmp_path):
    output_dir = tmp_path / "benchmark"
    result = run_script(
        "benchmarks/paper_digits.py",
        "--quick",
        "--data_dir",
        digits_dir,
        "--classifier_epochs",
        "2",
        "--max_train_steps",
        "3",
        "--num_samples",
        "16",
        "--output_dir",
        output_dir,
        launcher="python",
    )
    assert_ok(result)
    report = (output_dir / "results.md").read_text()
    assert "| unsupervised | 0 |" in report and "| pu | 0 |" in report
    assert report in result.stdout  # the table is printed
    results = json.loads((output_dir / "results.json").read_text())
    for method in ("unsupervised", "pu"):
        metrics = json.loads((output_dir / "runs" / f"{method}-seed0" / "evaluation" / "metrics.json").read_text())
        assert results["summary"][method]["rate"] == [metrics["non_sensitive_rate"]]
        assert metrics["num_samples"] == 16
    from PIL import Image

    chart, grids = Image.open(output_dir / "chart.png"), Image.open(output_dir / "grids.png")
    single = Image.open(output_dir / "runs" / "pu-seed0" / "evaluation" / "samples.png")
    assert grids.width > 2 * single.width and chart.width > 0

    # A second call reuses the finished runs instead of training and evaluating again.
    metrics_file = output_dir / "runs" / "pu-seed0" / "evaluation" / "metrics.json"
    written = metrics_file.stat().st_mtime_ns
    again = run_script(
        "benchmarks/paper_digits.py", "--quick", "--data_dir", digits_dir, "--output_dir", output_dir,
        "--max_train_steps", "3", "--num_samples", "16", launcher="python",
    )  # fmt: skip
    assert_ok(again)
    assert metrics_file.stat().st_mtime_ns == written
