"""TensorBoard: ``gradwatch.integrations.tensorboard.TensorBoardReporter`` (also ``reporters=["tensorboard"]``)."""

from gradwatch.reporters.tensorboard import TensorBoardReporter, findings_markdown

__all__ = ["TensorBoardReporter", "findings_markdown"]
