"""The per-interval reduction behind every metrics row."""

import pytest
import torch

from deqctl.engine.metrics import Accumulator, with_stop_reason


def test_reduce_weights_means_by_batch_and_keeps_partial_keys():
    acc = Accumulator()
    acc.add({"n": 30, "loss": torch.tensor(1.0), "fwd_nfe_max": 7, "accuracy": torch.tensor(0.5),
             "fwd_converged": torch.tensor(1.0), "jac_loss": torch.tensor(0.5)})
    acc.add({"n": 10, "loss": torch.tensor(3.0), "fwd_nfe_max": 12, "accuracy": torch.tensor(1.0),
             "fwd_converged": torch.tensor(0.5)})
    row = with_stop_reason(acc.reduce())
    assert row["loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert row["fwd_nfe_max"] == 12 and row["n"] == 40
    assert row["accuracy"] == pytest.approx(25 / 40)
    assert row["jac_loss"] == pytest.approx(0.5)        # only the step that estimated it
    assert row["fwd_stop"] == "max_iter"
    assert len(acc) == 0
