"""``taskgraph-norm report --norm layer``: LayerNorm's rows, in tests/test_cli.py's style."""

from __future__ import annotations

import pytest

from taskgraph_norm.errors import ConfigError
from taskgraph_norm.tools.cli import main
from taskgraph_norm.tools.report import ReportConfig, measure_rows
from taskgraph_norm.tools.report_layer import LAYER_SYSTEMS


def test_report_norm_layer_prints_every_layernorm_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--norm", "layer", "--shape", "3x20x256", "--repeats", "3", "--chunk-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "report (LayerNorm)" in out and "F.layer_norm" in out
    for system in LAYER_SYSTEMS:
        assert f"| {system.name} " in out
    assert "| best: " in out


def test_layer_report_measures_what_it_claims() -> None:
    rows = {r.name: r for r in measure_rows(ReportConfig(shape=(48, 1024), repeats=4, seed=1, norm="layer"))}
    for name in ("linear", "tree", "cat", "tree + exact"):
        assert rows[name].run_spread == 0 and rows[name].batch_invariant, name
        assert rows[name].proved.startswith("certified"), name
    # Negative control: a fresh random merge order per call moves the bits, run to run
    # and between a row alone and in its batch; exact sums make the same race order-free.
    race = rows["race (shuffled arrival)"]
    assert race.run_spread > 0 and not race.batch_invariant and race.proved.startswith("refuted")
    exact = rows["race + exact (shuffled arrival)"]
    assert exact.run_spread == 0 and exact.batch_invariant and exact.proved == "certified (exact)"
    assert rows["standard"].diff_vs_standard == 0 and rows["standard"].executor == "torch eager"
    assert all(r.agrees for r in rows.values()), "a measurement contradicts a certificate"
    assert all(r.max_abs_err < 1e-5 and r.max_ulp_err < 64 for r in rows.values())
    # Exact sums: a correctly rounded mean and an exact variance, then four roundings.
    assert exact.max_ulp_err <= 4 < max(rows[n].max_ulp_err for n in ("linear", "tree", "standard"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_layer_report_other_dtypes(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--norm", "layer", "--shape", "8x128", "--dtype", dtype, "--repeats", "2"]) == 0
    assert dtype in capsys.readouterr().out


def test_a_bad_norm_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report", "--norm", "group"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="norm"):
        measure_rows(ReportConfig(shape=(4, 64), norm="group"))
    assert main(["report", "--norm", "layer", "--shape", "0x64"]) == 2


def test_layer_report_out_draws_layernorm_graphs(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    assert main(["report", "--norm", "layer", "--shape", "8x256", "--repeats", "2", "--out", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "| tree + exact " in page and "timeline-race.svg" not in page
    for name in ("dag-linear.svg", "dag-tree.svg", "dag-race.svg", "dag-cat.svg"):
        assert f"]({name})" in page and (out / name).stat().st_size > 0
    assert "mean." in (out / "dag-tree.svg").read_text()  # the LayerNorm graph's nodes
    capsys.readouterr()
