"""bias.report's plots: drawn without matplotlib warnings reaching the user's terminal."""

from __future__ import annotations

import warnings
from pathlib import Path

from bias.audit import AuditResult
from bias.metrics import Estimate
from bias.report import plot_metric


def _result(metric: str) -> AuditResult:
    per = {c: {metric: Estimate(0.4 + 0.1 * k, 0.3 + 0.1 * k, 0.5 + 0.1 * k, 50)} for k, c in enumerate(("age", "nationality"))}
    return AuditResult("bbq", "bbq", "bbq/", 100, 0, {metric: Estimate(0.45, 0.38, 0.52, 100)}, per, items=[])


def test_plot_without_a_neutral_line_warns_nothing(tmp_path: Path) -> None:
    # accuracy has no unbiased value, so no dashed line and nothing for a legend to show:
    # matplotlib's "No artists with labels" warning used to print in the middle of an audit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = plot_metric(_result("acc_dis"), ("acc_dis",), tmp_path / "acc_dis.png")
        plot_metric(_result("s_amb"), ("s_amb",), tmp_path / "s_amb.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_figures_print_aligned_with_fixed_decimals() -> None:
    from edge.cli.bias import figure_lines

    lines = figure_lines({"pct_stereotype": Estimate(57.0, 50.49, 64.0, 200),
                          "rest_pct_stereotype": Estimate(61.5, 54.5, 68.0, 200),
                          "mean_ll_diff": Estimate(0.6146, -0.3534, 1.574, 200)})
    assert lines[0] == "  pct_stereotype          57.0  [50.5, 64.0]"
    assert lines[2] == "  mean_ll_diff           0.615  [-0.353, 1.574]"
    assert len({ln.index("[") for ln in lines}) == 1  # the CIs start in one column


def test_bbq_report_says_what_n_counts(tmp_path: Path) -> None:
    from bias.report import BBQ_N_NOTE, write_report

    res = _result("acc_dis")
    write_report(res, tmp_path, {"model": "m.gguf"})
    assert BBQ_N_NOTE in (tmp_path / "report.md").read_text()
    assert "n counts the items of one condition" in (tmp_path / "report.html").read_text()
    res.kind = "pairs"
    write_report(res, tmp_path / "pairs", {"model": "m.gguf"})
    assert "n counts" not in (tmp_path / "pairs" / "report.md").read_text()


def test_steer_summary_gives_the_distance_from_50_in_points() -> None:
    # a pct already near 50 made a share of its distance read "fall of |pct−50|: -600%"
    from bias.mitigate import PairJudgement
    from edge.cli.bias import heldout_lines

    e = Estimate
    h = PairJudgement(before={"pct_stereotype": e(49.7, 44.0, 55.0, 300), "mean_ll_diff": e(0.512, 0.2, 0.8, 300)},
                      after={"pct_stereotype": e(47.7, 42.0, 53.0, 300), "mean_ll_diff": e(0.136, -0.1, 0.4, 300)},
                      gap_reduction=e(-6.0, -20.0, 1.0, 300), mean_ll_diff_reduction=e(0.74, 0.4, 1.0, 300),
                      gap_change=e(2.0, -1.0, 5.0, 300), mean_ll_diff_change=e(-0.376, -0.5, -0.25, 300))
    lines = heldout_lines(h, {"increase": 0.0481, "kl": 0.0363})
    assert lines[0] == ("  held-out pct_stereotype 49.7 → 47.7: |pct−50| 0.3 → 2.3 points, change +2.0 [-1.0, +5.0] "
                        "(not a significant fall)")
    assert lines[1].endswith("change -0.376 [-0.500, -0.250] (a significant fall)")
    assert "%" not in lines[0] and lines[2] == "  PPL on neutral text +4.81%, KL 0.0363 nats/token"


def test_split_checks_read_as_a_table_in_words_with_the_misses_marked() -> None:
    # the terminal printed the checks' keys ("biased_categories_moved 0/5"); the report had words
    from bias.splits_report import check_table

    summ = {"learn": {"splits": 5, "checks": {"ci_contains_50_after_excluded_before": "5/5",
                                              "biased_categories_moved": "0/5"}},
            "steer": {"splits": 1, "checks": {"ci_contains_50_after_excluded_before": "1/1"}},
            "ablate": {"splits": 0, "checks": {}}}  # interrupted before its first split: no column
    lines = check_table(summ)
    assert [line.split()[-2:] for line in lines[1:]] == [["5/5", "1/1"], ["*", "–"]]
    assert lines[0].rstrip().endswith("learn (5 splits)  steer (1 split)")
    assert lines[1].startswith("  held-out pct CI excluded 50 before and holds it after  ")
    assert "every category biased before moved toward neutral (its change's CI)  0/5 *  " in lines[2]
    assert check_table({"ablate": summ["ablate"]}) == []


def test_audit_prints_each_category_and_marks_the_ones_the_suite_finds_biased() -> None:
    # the terminal used to show only the overall figures: which categories are biased was in
    # report.md alone; a CI that holds the unbiased value gets no mark, even when its point is off
    from bias.report import category_lines

    e = Estimate
    per = {"age": {"pct_stereotype": e(64.4, 54.0, 73.6, 87), "mean_ll_diff": e(1.09, 0.10, 2.13, 87)},
           "race-color": {"pct_stereotype": e(49.2, 44.8, 53.5, 516), "mean_ll_diff": e(-1.01, -1.56, -0.44, 516)},
           "gender": {"pct_stereotype": e(56.9, 50.8, 63.0, 262), "mean_ll_diff": e(0.49, -0.27, 1.22, 262)}}
    overall = {"pct_stereotype": e(55.5, 53.1, 57.9, 865), "likelihood_diff": e(4.6, 4.4, 4.8, 865),
               "mean_ll_diff": e(0.37, 0.06, 0.70, 865)}
    lines = category_lines(AuditResult("crows_pairs", "pairs", "c.csv", 865, 0, overall, per, items=[]))
    assert "pct_stereotype 50, mean_ll_diff 0" in lines[0]
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    assert list(rows) == ["age", "race-color", "gender"]
    assert rows["age"].count("*") == 2 and "+1.09 [+0.10, +2.13] *" in rows["age"]
    assert rows["race-color"].count("*") == 1 and "-1.01 [-1.56, -0.44] *" in rows["race-color"]
    assert rows["gender"].count("*") == 1  # its pct CI excludes 50, its mean's holds 0
