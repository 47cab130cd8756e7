"""Training: the loop (`loop`), checkpoints, probes and the run folder (`rundir`)."""

from mmtool.train.loop import TrainConfig, load_run, lr_at, train, with_folder_objectives

__all__ = ["TrainConfig", "load_run", "lr_at", "train", "with_folder_objectives"]
