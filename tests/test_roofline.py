"""``benchmarks/roofline.py``: its arithmetic and tables from made-up timings, a
``--quick`` run on tiny sizes (nothing about the timings is asserted) and the
memory probe's two controls, one of which must find the output's allocation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import roofline, roofline_memory

SECONDS = {roofline.COPY: 1e-3, roofline.FLOAT_OUT: 2e-3, roofline.EXACT_OUT: 3e-3, roofline.FLOAT: 4e-3,
           roofline.EXACT: 5e-3, roofline.EAGER_W: 9e-3, roofline.EAGER: 8e-3, roofline.COMPILED: 2e-3}


def test_bytes_moved_is_input_plus_output_bytes() -> None:
    assert roofline.bytes_moved(1024, 4096, "fp32") == 2 * 1024 * 4096 * 4
    assert roofline.bytes_moved(1024, 4096, "bf16") == roofline.bytes_moved(1024, 4096, "fp16") == 2 * 1024 * 4096 * 2
    assert roofline.gbps(2 * 10**9, 0.5) == 4.0


def test_a_short_call_is_timed_in_a_loop_of_calls() -> None:
    assert roofline.calls_per_timing(roofline.bytes_moved(4096, 4096, "fp32")) == 1
    assert roofline.calls_per_timing(roofline.bytes_moved(1, 4096, "fp32")) == 256
    assert 1 < roofline.calls_per_timing(roofline.bytes_moved(8192, 64, "bf16")) < 256


def test_the_roofline_table_gives_gbps_names_torchs_best_and_divides_by_copy() -> None:
    case = {"rows": 1024, "hidden": 4096, "dtype": "fp32", "bytes": 32 * 2**20, "calls": 1, "seconds": SECONDS}
    line = roofline.roofline_table([case]).splitlines()[-1]
    assert roofline.torch_best(SECONDS) == roofline.COMPILED
    assert line.startswith("| 1024x4096 fp32 | 32 | 33.6 | 16.8 | 11.2 | 8.4 | 6.7 | 16.8 (torch.compile")
    assert line.endswith("| 2.00x | 3.00x | 2.00x |")
    eager_only = {k: v for k, v in SECONDS.items() if k != roofline.COMPILED}
    assert roofline.torch_best(eager_only) == roofline.EAGER


def test_the_scaling_table_has_a_line_per_size_and_thread_count() -> None:
    points = [{"sweep": "rows", "threads": t, "rows": 1, "hidden": 4096, "bytes": 32768, "calls": 256,
               "seconds": {roofline.COPY: 1e-6, roofline.FLOAT_OUT: 4e-6, roofline.EXACT_OUT: 6e-6}} for t in (1, 2)]
    lines = roofline.scaling_table(points).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| rows | 1 | 1 | 4096 | 32 | 32.8 | 8.2 | 5.5 | 4.00x | 6.00x |")


def test_the_ceiling_table_gives_each_dtypes_in_cache_gbps() -> None:
    assert roofline.bytes_moved(roofline.CEILING_BYTES // roofline.bytes_moved(1, 4096, "bf16"), 4096, "bf16") \
        == roofline.CEILING_BYTES
    point = {"rows": 32, "hidden": 4096, "dtype": "bf16", "bytes": 2**19, "calls": 32, "threads": 2,
             "seconds": {roofline.COPY: 2**19 / 1e11, roofline.FLOAT_OUT: 2**19 / 1e10, roofline.EXACT_OUT: 2**19 / 5e9}}
    assert roofline.ceiling_table([point]).splitlines()[-1] == "| bf16 | 32x4096 | 100.0 | 10.0 | 5.0 | 20.0 (2 threads) |"


def test_options() -> None:
    quick = roofline.parse_args(["--quick"])
    assert quick.rounds == 3 and not quick.compile and quick.memory_cases == roofline.QUICK_MEMORY_CASES
    tiny = roofline.parse_args(["--shapes", "8x64", "--rows", "--memory-shape", "none", "--rounds", "2"])
    assert tiny.shapes == ((8, 64),) and tiny.rows == () and tiny.memory_shape is None and tiny.rounds == 2
    assert set(roofline_memory.CASES) >= set(roofline.QUICK_MEMORY_CASES)
    with pytest.raises(SystemExit):
        roofline.parse_args(["--rounds", "0"])


def test_a_quick_run_on_tiny_sizes_writes_its_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "roofline.json"
    roofline.main(["--quick", "--shapes", "8x64", "--dtypes", "fp32", "bf16", "--rows", "1", "2", "--hidden", "64",
                   "--memory-shape", "none", "--rounds", "1", "--json", str(path)])
    result = json.loads(path.read_text())
    assert [(c["rows"], c["dtype"]) for c in result["roofline"]] == [(8, "fp32"), (8, "bf16")]
    assert set(result["roofline"][0]["seconds"]) == {roofline.COPY, roofline.FLOAT_OUT, roofline.EXACT_OUT,
                                                     roofline.FLOAT, roofline.EXACT, roofline.EAGER_W, roofline.EAGER}
    assert {(p["sweep"], p["threads"]) for p in result["scaling"]} >= {("rows", 1), ("hidden", 1)}
    assert [p["dtype"] for p in result["ceilings"]] == ["fp32", "bf16"]
    assert "GB/s" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    from benchmarks import roofline_plot

    drawn = roofline_plot.draw(result, tmp_path / "images")
    assert [p.name for p in drawn] == ["roofline.png", "scaling.png"] and all(p.stat().st_size for p in drawn)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the probe reads /proc")
def test_the_memory_probe_sees_a_fresh_output_and_nothing_for_a_copy() -> None:
    rows, hidden = 256, 4096  # a 4 MiB output: above the probe's 64 KiB mmap threshold
    fresh = roofline_memory.probe("torch.empty_like(x).fill_(0) (control: the output)", rows, hidden)
    copy = roofline_memory.probe("out.copy_(x) (control: 0)", rows, hidden)
    assert fresh["peak_extra"] >= fresh["output_bytes"]
    assert copy["peak_extra"] < fresh["output_bytes"] / 8
    assert "0.00x" in roofline_memory.memory_table([copy])
