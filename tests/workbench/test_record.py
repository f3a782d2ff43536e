"""The typed measurement record and its JSON."""

import json

import numpy as np
import pytest

pytest.importorskip("flax")

from experiments.measurements import Record  # noqa: E402
from experiments.record import Eigenvalues, Estimate  # noqa: E402


def test_records_round_trip_through_json():
    record = Record(
        step=3,
        member="relu-seed0",
        fingerprint="abc",
        train_loss=1.0,
        train_accuracy=0.5,
        test_loss=float("nan"),
        test_accuracy=0.25,
        grad_norm=2.0,
        learning_rate=0.1,
        edge_of_stability=20.0,
        lambda_max=Eigenvalues((4.0,), (1e-4,), (True,), 21),
        trace=Estimate(12.0, 0.5, 30),
        extra={"mine": {"a": 1}},
    )
    again = Record.from_json(json.loads(json.dumps(record.to_json())))
    assert again.lambda_max == record.lambda_max and again.trace == record.trace
    assert np.isnan(again.test_loss) and again.extra == {"mine": {"a": 1}}
    assert again.sharpness_ratio == pytest.approx(0.2)
