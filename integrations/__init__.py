"""Glue between gradwatch and other tools, installed as ``gradwatch.integrations``.

- :mod:`gradwatch.integrations.keras`: ``KerasCallback`` and the Keras 3 adapter.
- :mod:`gradwatch.integrations.wandb`: ``WandbReporter`` for Weights & Biases.

Nothing here is imported by ``import gradwatch``; each module loads its framework on use.
"""
