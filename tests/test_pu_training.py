"""pu_training: the pieces of the shared run that can be checked without launching one."""

import pytest
import torch

import pu_training
from pu_loss import RiskOutput


def test_a_non_finite_loss_stops_with_the_step_named():
    risk = RiskOutput(loss=torch.tensor(float("nan")), unlabeled_loss=torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="step 17"):
        pu_training.check_finite(risk.to_log_dict(), 17, "out")
    pu_training.check_finite(
        RiskOutput(loss=torch.tensor(2.0), unlabeled_loss=torch.tensor(2.0)).to_log_dict(), 18, "out"
    )
