"""Root conftest: import torch before tensorflow (in the other order one of them can segfault, as Keras' own
conftest notes), and keep W&B silent and offline in every test."""

import contextlib
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

with contextlib.suppress(ModuleNotFoundError):
    import torch
