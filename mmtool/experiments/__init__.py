"""Shipped experiments: the positive controls (`controls`) and sweeps (`sweep`, its evaluations
and report)."""

from mmtool.experiments.controls import (EXPERIMENTS, Check, ExperimentConfig, ExperimentResult,
                                         run_experiment)

__all__ = ["EXPERIMENTS", "Check", "ExperimentConfig", "ExperimentResult", "run_experiment"]
