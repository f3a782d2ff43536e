"""Run-directory files: the append-only metrics log."""

import pytest

pytest.importorskip("flax")

from experiments import (  # noqa: E402
    storage,
)


def test_metrics_log_drops_a_record_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 10}\n{"step": 20, "hessian": {"top": [1.0]}')
    assert [r["step"] for r in storage.read_metrics(path)] == [0, 10]
    log = storage.MetricsLog(path)
    assert log.steps == {0, 10}
    assert path.read_text() == '{"step": 0}\n{"step": 10}\n'
