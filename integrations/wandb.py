"""Weights & Biases: ``gradwatch.integrations.wandb.WandbReporter`` (also ``gradwatch.WandbReporter`` and
``reporters=["wandb"]``). The reporter itself lives with the others in :mod:`gradwatch.reporters.wandb`."""

from gradwatch.reporters.wandb import WandbReporter

__all__ = ["WandbReporter"]
