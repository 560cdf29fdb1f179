"""The benchmark code keeps working (the numbers themselves live in bench/RESULTS.md)."""

from __future__ import annotations

from bench import steps
from bench.harness import Table, in_child


def _square(x: int) -> dict:
    return {"value": x * x}


def test_step_benchmark_runs_and_one_step_is_faster():
    table = steps.run("quick")
    assert isinstance(table, Table) and len(table.rows) == 2
    for row in table.rows:
        assert float(row[-1].rstrip("x")) > 5  # 40 teacher steps vs 1 SMFSR step


def test_child_processes_report_results_and_errors():
    assert in_child(_square, 7) == {"value": 49}
    assert "error" in in_child(_square, "x")
