"""Logging through training: segments of a project, their checkpoints, and attribution through the
trajectory (TracIn-CP and segment-wise curvature). See analog.trajectory.segments for the rules."""

from analog.trajectory.checkpoint import load_checkpoint, parameters_of, save_checkpoint
from analog.trajectory.layout import SegmentError, SegmentRecord
from analog.trajectory.scores import segment_scores, weighted_sum
from analog.trajectory.segments import Trajectory

__all__ = ["SegmentError", "SegmentRecord", "Trajectory", "load_checkpoint", "parameters_of", "save_checkpoint",
           "segment_scores", "weighted_sum"]
