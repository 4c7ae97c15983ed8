"""Reporters: where findings and summaries go. Third-party sinks such as W&B live in gradwatch.integrations."""

from gradwatch.reporters.base import Reporter

__all__ = ["Reporter"]
