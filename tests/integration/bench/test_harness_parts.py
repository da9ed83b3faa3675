"""The harness's own pieces: rule files vs ground truth, trace-id recycling, histogram quantiles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from betrace.rules.loader import load_rules
from betrace.streams.otlp import OtlpDecoder, Record
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import probes
from harness.producers import ProducerPlan, build_pool, patched, prefix_for
from harness.rules import RULES, check_rules_against_workload, tenant_names, write_rule_files


def test_rule_files_load_and_match_the_workload_ground_truth(tmp_path: Path) -> None:
    rules = load_rules(write_rule_files(tmp_path, tenant_names(3)))
    assert {t: len(r) for t, r in rules.tenants.items()} == {"t000": 20, "t001": 20, "t002": 20}
    assert {r[1] for r in RULES} == {"betrace", "traceql", "sequence"}
    assert check_rules_against_workload() > 0  # raises SystemExit on any disagreement


def test_recycled_pool_messages_carry_new_trace_ids_and_the_same_spans(tmp_path: Path) -> None:
    plan = ProducerPlan(
        index=2, brokers="", topic="", tenant_header="X-Scope-OrgID", tenants=("a", "b"), rate=1.0,
        duration_s=1.0, pool_spans=3_000, spans_per_message=200, violation_rate=0.3, seed=5,
        result_file=tmp_path / "r.json",
    )  # fmt: skip
    pool = build_pool(plan)
    assert sum(m.spans for m in pool) >= 3_000
    decoder = OtlpDecoder(encoding="otlp_proto", tenant_header="X-Scope-OrgID", default_tenant="default")
    seen: set[str] = set()
    for cycle in (0, 1):
        prefix = prefix_for(plan.index, cycle)
        for message in pool:
            value = patched(message, prefix)
            table = decoder.decode([Record(value, None, [("X-Scope-OrgID", message.tenant)])]).spans
            assert table.num_rows == message.spans
            ids = set(table.column("trace_id").to_pylist())
            assert all(i.startswith(prefix.hex()) for i in ids)
            assert {prefix.hex() + rest for _, _, rest in message.violations} <= ids
            assert not ids & seen  # a new cycle is new traces
            seen |= ids
    with pytest.raises(RuntimeError, match="pool cycles"):
        prefix_for(0, 70_000)


def test_histogram_quantile_interpolates_within_buckets() -> None:
    text = "\n".join(
        [
            'betrace_evaluate_seconds_bucket{le="0.01",stage="evaluate"} 50.0',
            'betrace_evaluate_seconds_bucket{le="0.1",stage="evaluate"} 90.0',
            'betrace_evaluate_seconds_bucket{le="1.0",stage="evaluate"} 100.0',
            'betrace_evaluate_seconds_bucket{le="+Inf",stage="evaluate"} 100.0',
            'betrace_sink_rows_total{sink="duckdb"} 1234.0',
            'betrace_sink_rows_total{sink="signals"} 7.0',
        ]
    )
    hist = probes.parse_histogram(text, "betrace_evaluate_seconds")
    assert hist == {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert probes.histogram_quantile(hist, 0.5) == pytest.approx(0.01)
    assert probes.histogram_quantile(hist, 0.95) == pytest.approx(0.1 + 0.9 * 0.5)
    assert probes.histogram_quantile({}, 0.99) is None
    assert probes.parse_counter(text, "betrace_sink_rows_total", 'sink="duckdb"') == 1234.0
    older = {0.01: 40.0, 0.1: 40.0, 1.0: 40.0, float("inf"): 40.0}
    assert probes.diff_histogram(hist, older)[0.01] == 10.0


def test_proc_readers_see_this_process() -> None:
    import os

    rss = probes.rss_bytes(os.getpid())
    cpu = probes.cpu_seconds(os.getpid())
    assert rss is not None and rss > 10 * 2**20
    assert cpu is not None and cpu > 0
    assert probes.rss_bytes(2**22 + 12345) is None


def test_plot_is_skipped_with_a_message_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    why = report.plot(tmp_path / "p.png", {"samples": []})
    assert why is not None and "matplotlib is not installed" in why
    assert not (tmp_path / "p.png").exists()


def test_the_cli_does_not_import_matplotlib_or_the_harness() -> None:
    import subprocess

    code = (
        "import sys, betrace.cli.main as m; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(m.app, ['bench', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'matplotlib' not in sys.modules and 'harness' not in sys.modules, 'imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
