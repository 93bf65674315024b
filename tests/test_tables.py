"""The helpers every report shares: one number format, one CSV, one metrics.jsonl reader."""
import csv
import io
import json

from monoroute.tables import csv_text, fmt, peak_rss_mb
from monoroute.train.rundir import read_metrics


def test_fmt_is_none_safe_and_rounds_floats_only():
    assert fmt(None) == "–" and fmt(None, none="") == ""
    assert fmt(1.23456) == "1.235" and fmt(1.23456, 1) == "1.2" and fmt(7) == "7" and fmt("x") == "x"


def test_csv_text_round_trips_with_quotes_and_commas():
    text = csv_text(["a", "b"], [["x,y", 'say "hi"'], [1, ""]])
    assert list(csv.reader(io.StringIO(text))) == [["a", "b"], ["x,y", 'say "hi"'], ["1", ""]]


def test_peak_rss_is_this_process_in_megabytes():
    assert 10 < peak_rss_mb() < 24 * 1024  # a Python process with torch loaded, below the machine's memory


def test_every_metrics_reader_skips_the_same_bad_lines(tmp_path):
    from monoroute.circuits.run import run_val_loss
    from monoroute.interp.analyze import median_tokens_per_s

    lines = [json.dumps({"step": 1, "tokens_per_s": 100.0}), "[1, 2]", json.dumps({"step": 2, "tokens_per_s": 300.0,
             "val_loss": 2.5}), '{"step": 3, "tokens_per_s": 50', ""]  # a list, a torn last line, a blank
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert median_tokens_per_s(tmp_path) == 200.0  # used to give None for the whole file on one bad line
    assert run_val_loss(tmp_path) == 2.5
    assert read_metrics(tmp_path / "missing") == [] and median_tokens_per_s(tmp_path / "missing") is None


def test_aligned_lines_and_html_page():
    from monoroute.tables import CSS, aligned_lines, html_page

    assert aligned_lines(["a", "bb"], [["xyz", 1], ["q", 22]]) == ["a    bb", "xyz  1 ", "q    22"]
    assert aligned_lines(["a", "bb"], [["xyz", 1]], strip=True) == ["a    bb", "xyz  1"]
    page = html_page("t<1>", "<p>x</p>")
    assert page.startswith("<!doctype html>") and "<title>t&lt;1&gt;</title>" in page and CSS in page
    assert page.endswith("<p>x</p></body></html>")
