"""Training-step overhead of gradwatch, against no monitoring and against the peers a user would otherwise pick.

PyTorch (``--torch``, the default): tests/benchmarks/torch_cost.py: a 20x512 tanh MLP, a small ResNet, a
transformer encoder, a 2-layer LSTM and a GPT-2 from ``transformers``, each plain, with the one-norm floor, with
gradwatch at its defaults, with ``wandb.watch(log="gradients")`` at ``log_freq`` 1 and 100 and with Lightning's
``grad_norm``; amortised means over whole schedule periods, variants taking turns step by step; then the scale
rows (a 1,000-layer model, RSS over 20,000 steps). Keras (``--keras``): a 20-layer MLP, a small CNN, a SimpleRNN
and an LSTM, ``fit()`` plain, with ``gradwatch.KerasCallback`` and with ``keras.callbacks.TensorBoard(
histogram_freq=1)``. GPU: tests/benchmarks/gpu.py.

Run: pip install -c constraints.txt -e ".[bench]" && python tests/benchmarks/overhead.py [--torch] [--keras
[--keras-backend jax|torch] [--copies N] [--keras-stepped]] [--keras-backends] [--keras-async --keras-backend jax|torch]
[--keras-fits --keras-backend tensorflow|jax|torch] [--keras-starts --keras-backend tensorflow|jax]
[--frameworks] [--rounds 3]
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="PyTorch models (default when neither is given)")
    ap.add_argument("--keras", action="store_true", help="Keras models")
    ap.add_argument("--frameworks", action="store_true",
                    help="HF Trainer, Lightning, accelerate, torch.compile, DDP, FSDP2 (benchmarks/frameworks.py)")
    ap.add_argument("--keras-backend", choices=("tensorflow", "jax", "torch"),
                    help="with --keras: the Keras backend (default: $KERAS_BACKEND or tensorflow)")
    ap.add_argument("--keras-async", action="store_true",
                    help="with --keras-backend jax|torch: verbose=0 fits, whose batch-end hooks Keras runs in a "
                         "worker thread (keras_cost.bench_async)")
    ap.add_argument("--keras-fits", action="store_true",
                    help="with --keras-backend: whole verbose=0 fits taking turns from one thread "
                         "(keras_cost.bench_fits)")
    ap.add_argument("--keras-starts", action="store_true",
                    help="with --keras-backend: the fit start over fresh fits, one at a time (keras_cost.bench_starts)")
    ap.add_argument("--keras-backends", action="store_true",
                    help="--keras on TensorFlow, JAX and torch, each in its own process (fixed at import)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per variant")
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--copies", type=int, default=1,
                    help="--keras: fresh copies per variant, each timed over --rounds epochs; the row is the median "
                         "over copies (keras_cost.bench)")
    ap.add_argument("--keras-stepped", action="store_true",
                    help="with --keras on TensorFlow: the variants take turns from one thread, fit()'s loop "
                         "unrolled, instead of a fit() thread each (keras_cost._stepped)")
    ap.add_argument("--only", default="", help="Keras: only the models whose name contains this (e.g. CNN)")
    args = ap.parse_args()
    if args.keras_backends:
        import subprocess

        for backend in ("tensorflow", "jax", "torch"):
            subprocess.run([sys.executable, __file__, "--keras", "--keras-backend", backend, "--rounds",
                            str(args.rounds), "--steps", str(args.steps), "--copies", str(args.copies), "--only",
                            args.only], check=True)
        return
    if args.keras_backend:
        os.environ["KERAS_BACKEND"] = args.keras_backend
    if args.keras_starts:
        from tests.benchmarks import keras_cost

        print(keras_cost.starts_table(keras_cost.bench_starts(args.rounds, args.only)))
        return
    if args.keras_async or args.keras_fits:
        from tests.benchmarks import keras_cost

        bench = keras_cost.bench_async if args.keras_async else keras_cost.bench_fits
        print(keras_cost.table(bench(args.rounds, args.only)))
        return
    if not args.torch and not args.keras and not args.frameworks:
        args.torch = True
    if args.torch:
        from tests.benchmarks import torch_cost

        torch_cost.main(args.rounds, args.only, scale=not args.only)
    if args.keras:
        from tests.benchmarks import keras_cost

        print(keras_cost.table(keras_cost.bench(args.rounds, args.only, args.copies, args.keras_stepped)))
    if args.frameworks:
        from tests.benchmarks.frameworks import bench_frameworks, table

        print(table(bench_frameworks(args.rounds, args.steps)))


if __name__ == "__main__":
    main()
