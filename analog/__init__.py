"""analog: log what a neural network computes per example, and analyse it."""

from analog.analog import AnaLog
from analog.config import Config

__version__ = "0.1.0"
__all__ = ["AnaLog", "Config", "__version__"]
