"""analog: log what a neural network computes per example, and analyse it."""

from analog.analog import AnaLog
from analog.config import Config
from analog.schedule import AnaLogScheduler

__version__ = "0.1.0"
__all__ = ["AnaLog", "AnaLogScheduler", "Config", "__version__"]
