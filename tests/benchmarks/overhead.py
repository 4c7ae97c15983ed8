"""Training-step overhead of gradwatch, against no monitoring and against the peers a user would otherwise pick.

PyTorch (``--torch``, the default): tests/benchmarks/torch_cost.py: a 20x512 tanh MLP, a small ResNet, a
transformer encoder, a 2-layer LSTM and a GPT-2 from ``transformers``, each plain, with the one-norm floor, with
gradwatch at its defaults, with ``wandb.watch(log="gradients")`` at ``log_freq`` 1 and 100 and with Lightning's
``grad_norm``; amortised means over whole schedule periods, variants taking turns step by step; then the scale
rows (a 1,000-layer model, RSS over 20,000 steps). Keras (``--keras``): a 20-layer MLP, a small CNN, a SimpleRNN
and an LSTM, ``fit()`` plain, with ``gradwatch.KerasCallback`` and with ``keras.callbacks.TensorBoard(
histogram_freq=1)``. GPU: tests/benchmarks/gpu.py.

Run: pip install -c constraints.txt -e ".[bench]" && python tests/benchmarks/overhead.py [--torch] [--keras
[--keras-backend jax|torch]] [--keras-backends] [--frameworks] [--rounds 3]
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def bench_keras(rounds: int, steps: int, only: str = "") -> list[tuple[str, dict[str, float]]]:
    import keras
    import numpy as np

    import gradwatch

    def mlp20():
        layers = [keras.Input((64,))] + [keras.layers.Dense(256, activation="relu", kernel_initializer="he_normal")
                                         for _ in range(20)] + [keras.layers.Dense(1)]
        return keras.Sequential(layers), np.random.randn(128 * steps, 64).astype("float32"), \
            np.random.randn(128 * steps, 1).astype("float32"), "mse", 128

    def cnn():
        m = keras.Sequential([keras.Input((32, 32, 3))] + [
            layer for _ in range(3) for layer in (keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
                                                    keras.layers.BatchNormalization(), keras.layers.ReLU())
        ] + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
        return m, np.random.randn(32 * steps, 32, 32, 3).astype("float32"), \
            np.random.randint(0, 2, (32 * steps,)), "sparse_categorical_crossentropy", 32

    def rnn():  # the time probe makes fit() compute the input gradient of a first-layer RNN on every step
        m = keras.Sequential([keras.Input((60, 8)), keras.layers.SimpleRNN(128), keras.layers.Dense(2)])
        return m, np.random.randn(64 * steps, 60, 8).astype("float32"), \
            np.random.randint(0, 2, (64 * steps,)), "sparse_categorical_crossentropy", 64

    def lstm():
        m = keras.Sequential([keras.Input((60, 8)), keras.layers.LSTM(128), keras.layers.Dense(2)])
        return m, np.random.randn(64 * steps, 60, 8).astype("float32"), \
            np.random.randint(0, 2, (64 * steps,)), "sparse_categorical_crossentropy", 64

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(time.perf_counter() - self.t0)

    out = []
    for name, make in {"Keras MLP, 20 layers": mlp20, "Keras CNN + BN": cnn,
                       "Keras SimpleRNN, 60 steps": rnn, "Keras LSTM, 60 steps": lstm}.items():
        if only.lower() not in name.lower():
            continue
        model, x, y, loss, bs = make()
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss)
        model.fit(x[:bs * 3], y[:bs * 3], batch_size=bs, verbose=0)
        # "gradwatch, activation_every=0" isolates what the activation sampling and the RNN time probe cost.
        times: dict[str, list[float]] = {"plain": [], "gradwatch": [], "gradwatch, activation_every=0": []}
        if keras.backend.backend() == "tensorflow":  # its histograms are a TensorFlow feature
            times["TensorBoard(histogram_freq=1)"] = []
        startup: dict[str, list[float]] = {k: [] for k in times}
        names = list(times)
        for r in range(rounds):
            # Rotate the order each round: a variant's after-effects (TensorBoard's writer thread, a re-trace)
            # must not always land on the same neighbour.
            for variant in names[r % len(names):] + names[:r % len(names)]:
                timer = EpochTimer()
                cbs = [timer]
                if variant == "gradwatch":
                    cbs.insert(0, gradwatch.KerasCallback(reporters=[]))
                elif variant.startswith("gradwatch,"):
                    cbs.insert(0, gradwatch.KerasCallback(reporters=[], activation_every=0))
                elif variant.startswith("TensorBoard"):
                    cbs.insert(0, keras.callbacks.TensorBoard(log_dir=tempfile.mkdtemp(), histogram_freq=1))
                # Steady state: the second epoch, from its start to the end of every callback's on_epoch_end
                # (TensorBoard writes its histograms there). The first epoch also holds the one-time cost of a
                # fit() start (gradwatch re-traces the train step), reported in the notes below the table.
                # Every variant starts from a fresh trace, as gradwatch's does: a train function kept from an
                # earlier fit() ran its second epoch ~40% slower than a fresh one for the CNN (measured), which
                # would flatter every variant that re-traces.
                model.train_function = None
                model.fit(x, y, batch_size=bs, epochs=2, verbose=0, callbacks=cbs)
                n = len(x) // bs
                times[variant].append(timer.epochs[1] / n)
                startup[variant].append(timer.epochs[0] - timer.epochs[1])
        name = f"{name} ({keras.backend.backend()})"
        out.append((name, {k: statistics.median(v) for k, v in times.items()}))
        print(f"{name}: first-epoch extra time (tracing, fit start): " + ", ".join(
            f"{k} {statistics.median(v):.2f} s" for k, v in startup.items()), file=sys.stderr)
    return out


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    variants = list(rows[0][1])
    lines = ["| model | " + " | ".join(f"{v} (ms/step)" for v in variants) + " | " +
             " | ".join(f"{v} overhead" for v in variants[1:]) + " |",
             "|---" * (1 + 2 * len(variants) - 1) + "|"]
    for name, t in rows:
        base = t["plain"]
        lines.append(f"| {name} | " + " | ".join(f"{t[v] * 1e3:.2f}" for v in variants) + " | " +
                     " | ".join(f"{(t[v] / base - 1) * 100:+.1f}%" for v in variants[1:]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="PyTorch models (default when neither is given)")
    ap.add_argument("--keras", action="store_true", help="Keras models")
    ap.add_argument("--frameworks", action="store_true",
                    help="HF Trainer, Lightning, accelerate, torch.compile, DDP, FSDP2 (benchmarks/frameworks.py)")
    ap.add_argument("--keras-backend", choices=("tensorflow", "jax", "torch"),
                    help="with --keras: the Keras backend (default: $KERAS_BACKEND or tensorflow)")
    ap.add_argument("--keras-backends", action="store_true",
                    help="--keras on TensorFlow, JAX and torch, each in its own process (fixed at import)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per variant")
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--only", default="", help="Keras: only the models whose name contains this (e.g. CNN)")
    args = ap.parse_args()
    if args.keras_backends:
        import subprocess

        for backend in ("tensorflow", "jax", "torch"):
            subprocess.run([sys.executable, __file__, "--keras", "--keras-backend", backend, "--rounds",
                            str(args.rounds), "--steps", str(args.steps), "--only", args.only], check=True)
        return
    if args.keras_backend:
        os.environ["KERAS_BACKEND"] = args.keras_backend
    if not args.torch and not args.keras and not args.frameworks:
        args.torch = True
    if args.torch:
        from tests.benchmarks import torch_cost

        torch_cost.main(args.rounds, args.only, scale=not args.only)
    if args.keras:
        print(table(bench_keras(args.rounds, args.steps, args.only)))
    if args.frameworks:
        from tests.benchmarks.frameworks import bench_frameworks

        print(table(bench_frameworks(args.rounds, args.steps)))


if __name__ == "__main__":
    main()
