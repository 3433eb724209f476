"""Analyses over logs: influence functions and their evaluation."""

from analog.analysis.evaluation import lds, mislabel_detection
from analog.analysis.influence import InfluenceFunction
from analog.analysis.results import InfluenceScores, TokenInfluence, TopKInfluence

__all__ = ["InfluenceFunction", "InfluenceScores", "TokenInfluence", "TopKInfluence", "lds", "mislabel_detection"]
