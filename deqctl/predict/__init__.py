"""Applying a trained model to new inputs: reading them as training read its data
(`inputs`), predicting a batch at a time with each input's solve (`rows`), and the time
stamps a forecast continues (`times`)."""

from .inputs import Failed, Inputs, Item, Reader
from .rows import Predictor
from .times import continue_times

__all__ = ["Failed", "Inputs", "Item", "Predictor", "Reader", "continue_times"]
