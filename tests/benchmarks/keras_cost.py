"""What gradwatch costs Keras ``fit()``, against no monitoring (and TensorBoard's histograms on TensorFlow).

Per model, one identical copy per variant (same weights, its own compiled optimizer), each trained by a real
``fit()`` in a thread of its own. The threads take turns batch by batch (the order rotating each step), so a slow
spell of the shared machine hits every variant alike; timing whole fits one after another (the previous harness)
put plain against plain at -20%..+22% on this machine. A variant's step time runs from its turn's
``on_train_batch_begin`` to its ``on_train_batch_end`` with the step's loss read back (so JAX's asynchronous
dispatch is waited for, in every variant alike); the last batch of an epoch also holds every callback's
``on_epoch_end`` (where TensorBoard writes its histograms).

- ``plain``: no callback but the timer; ``plain, again``: a second plain copy, whose figure is the harness's own
  noise;
- ``gradwatch``: ``gradwatch.KerasCallback(reporters=[])`` at its defaults (every=1: every step's gradients, the
  update ratio every 10th, activations every 25th, a flush every 25th);
- ``gradwatch, activation_every=0``: the same without activation sampling (what the sampling costs);
- ``floor`` (TensorFlow only): the L2 norm of every gradient in the traced step and nothing else (:func:`_floor`),
  the least an every-step monitor can cost, as the PyTorch table's floor;
- ``TensorBoard(histogram_freq=1)`` (TensorFlow only: its histograms are a TensorFlow feature).

The models: a 20-layer ReLU MLP, a CNN with batch norm, a SimpleRNN and an LSTM over 60 time steps, and an 8-layer
MLP in mixed precision (float16 layers, Adam in a ``LossScaleOptimizer``: gradwatch tells the skipped steps apart).

The figure per variant is the mean step time over each epoch after the first (50 steps: two whole periods of
gradwatch's schedules), as a ratio to plain in the same epoch: median (min..max) over epochs. The fit start is what
the first epoch costs beyond its steps at the variant's steady rate (from ``on_train_begin``: gradwatch's install,
every trace and compile, wherever in the epoch it falls), as a ratio to plain's.

On the torch backend, which runs eagerly, the threads gave nonsense (plain against plain -18%, gradwatch -51% on the
LSTM: torch's thread pools per Python thread): there each variant's ``train_step`` runs in turn from one thread, a
step at a time, with its callbacks' batch and epoch hooks called around it as ``fit()`` calls them.

``--keras-stepped`` (TensorFlow, :func:`_stepped`): the same variants and figures with no thread per variant:
``fit()``'s loop unrolled, every variant's step in turn from one thread, each step timed whole (its batch hooks
included). Neither harness leans one way: over 6 fresh copies each (2026-12-07), the threads read the TensorFlow
MLP's gradwatch at +7.4% where this one read +4.8%, and the SimpleRNN's at +3.4% where this one read +4.9%.

Run: python tests/benchmarks/overhead.py --keras [--keras-backend jax|torch] [--rounds 5] [--copies 6]
[--keras-stepped]

The timer above reads each step's loss back in ``on_train_batch_end``, which also makes Keras call every batch-end
hook on ``fit()``'s thread. A ``verbose=0`` fit with no such hook runs them in a worker thread instead (JAX and
torch; TensorFlow's Keras is always synchronous), and fit() dispatches the next step without waiting for the
last. ``--keras-async`` measures that: each variant (plain, plain again, gradwatch, gradwatch with a batch-end hook)
runs a ``verbose=0`` fit in a thread of its own, and the threads take turns epoch by epoch (the order rotating),
timed by callbacks with epoch hooks only. The figure is the mean step time of each epoch after the first, as a ratio
to plain's same epoch: median (min..max) over epochs. The batch-end hook is a callback whose ``on_train_batch_end``
is not marked async-safe (as the progress bar's at ``verbose=1``): Keras then stays synchronous.

``--keras-fits`` (:func:`bench_fits`) times whole ``verbose=0`` fits from one thread, the variants taking turns fit
by fit: slower to resolve a difference than turns of steps, but free of the threads' own effects.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable

STEPS = 50  # batches per epoch: two periods of activation_every and flush_every (25), five of update_every
FIT_EPOCHS = 5  # bench_fits: epochs per fit, the first not timed


def models(steps: int) -> dict[str, Callable]:
    import keras
    import numpy as np

    rng = np.random.default_rng(0)

    def mlp20():
        layers = [keras.Input((64,))] + [keras.layers.Dense(256, activation="relu", kernel_initializer="he_normal")
                                         for _ in range(20)] + [keras.layers.Dense(1)]
        return keras.Sequential(layers), rng.standard_normal((128 * steps, 64)).astype("float32"), \
            rng.standard_normal((128 * steps, 1)).astype("float32"), "mse", 128

    def cnn():
        m = keras.Sequential([keras.Input((32, 32, 3))] + [
            layer for _ in range(3) for layer in (keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
                                                    keras.layers.BatchNormalization(), keras.layers.ReLU())
        ] + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
        return m, rng.standard_normal((32 * steps, 32, 32, 3)).astype("float32"), \
            rng.integers(0, 2, (32 * steps,)), "sparse_categorical_crossentropy", 32

    def rnn():  # the time probe makes fit() compute the input gradient of a first-layer RNN on sampled steps
        m = keras.Sequential([keras.Input((60, 8)), keras.layers.SimpleRNN(128), keras.layers.Dense(2)])
        return m, rng.standard_normal((64 * steps, 60, 8)).astype("float32"), \
            rng.integers(0, 2, (64 * steps,)), "sparse_categorical_crossentropy", 64

    def lstm():
        m = keras.Sequential([keras.Input((60, 8)), keras.layers.LSTM(128), keras.layers.Dense(2)])
        return m, rng.standard_normal((64 * steps, 60, 8)).astype("float32"), \
            rng.integers(0, 2, (64 * steps,)), "sparse_categorical_crossentropy", 64

    def mixed():  # float16 layers: _optimizer() puts a LossScaleOptimizer around Adam, as compile() would
        layers = [keras.Input((64,))] + [keras.layers.Dense(256, activation="relu", kernel_initializer="he_normal",
                                                            dtype="mixed_float16") for _ in range(8)] + [
            keras.layers.Dense(1, dtype="float32")]
        return keras.Sequential(layers), rng.standard_normal((128 * steps, 64)).astype("float32"), \
            rng.standard_normal((128 * steps, 1)).astype("float32"), "mse", 128

    return {"Keras MLP, 20 layers": mlp20, "Keras CNN + BN": cnn, "Keras SimpleRNN, 60 steps": rnn,
            "Keras LSTM, 60 steps": lstm, "Keras MLP, 8 layers, mixed_float16": mixed}


def _optimizer(model):
    """Adam, inside a LossScaleOptimizer where the model has float16 layers (a mixed-precision run)."""
    import keras

    opt = keras.optimizers.Adam(1e-4)
    if any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers):
        return keras.optimizers.LossScaleOptimizer(opt)
    return opt


class _Turns:
    """Hands the turn to one thread at a time, in a rotating order: after every thread has had one turn, the
    next round starts with the next thread."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.cond = threading.Condition()
        self.round = 0
        self.pos = 0
        self.done: set[str] = set()
        self.arrived: set[str] = set()

    def arrive(self, name: str) -> None:
        """Wait until every thread is ready to train (each fit()'s own set-up done), then for ``name``'s turn."""
        with self.cond:
            self.arrived.add(name)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.arrived == set(self.names) and self.current() == name)

    def current(self) -> str:
        live = [n for n in self.names if n not in self.done]
        shift = self.round % len(live)
        return (live[shift:] + live[:shift])[self.pos % len(live)]

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current() == name)

    def passed(self, name: str, finished: bool = False) -> None:
        """The turn goes on; ``finished``: ``name`` takes no more turns (its position now holds the next)."""
        with self.cond:
            if finished:
                if name in self.done:
                    return
                self.done.add(name)
            else:
                self.pos += 1
            if self.done != set(self.names) and self.pos >= len(self.names) - len(self.done):
                self.pos, self.round = 0, self.round + 1
            self.cond.notify_all()


def _timer(name: str, turns: _Turns, steps: int, epochs: int):
    import keras

    class Timer(keras.callbacks.Callback):
        """Last in the callback list: times its own turns, holding the turn across an epoch's end (and the last
        epoch's across the end of training: every callback's ``on_train_end`` runs in its turn)."""

        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[list[float]] = []
            self.start = 0.0
            self.first = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append([])

        def on_train_batch_begin(self, batch, logs=None):
            if batch:
                turns.wait(name)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))  # wait for the step (JAX is async)
            now = time.perf_counter()
            if self.start and not self.first:
                self.first = now - self.start
            self.epochs[-1].append(now - self.t0)
            if batch + 1 < steps:
                turns.passed(name)

        def on_epoch_end(self, epoch, logs=None):
            self.epochs[-1][-1] = time.perf_counter() - self.t0  # the epoch's end, too
            if epoch + 1 < epochs:
                turns.passed(name)

        def on_train_end(self, logs=None):
            turns.passed(name, finished=True)

    return Timer()


def _starter(name: str, turns: _Turns, timer):
    import keras

    class Starter(keras.callbacks.Callback):
        """First in the callback list: waits for its turn before anything of the fit start runs."""

        def on_train_begin(self, logs=None):
            turns.arrive(name)
            timer.start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            if epoch:
                turns.wait(name)

    return Starter()


def _warmed(only: str):
    """``(label, model, its initial weights, (x, y, loss, batch size))`` per model whose label holds ``only``, once the
    model has fit two batches: the first trace in a process pays the backend's own warm-up, not any variant's."""

    for label, make in models(STEPS).items():
        if only.lower() in label.lower():
            model, x, y, loss, bs = make()
            weights = model.get_weights()
            model.compile(optimizer=_optimizer(model), loss=loss)
            model.fit(x[:bs * 2], y[:bs * 2], batch_size=bs, verbose=0)
            yield label, model, weights, (x, y, loss, bs)


def _variants() -> dict[str, Callable[[], list]]:
    """The variants every ``fit()`` harness times, each as the callbacks it adds: plain twice (the second is the
    harness's own noise), gradwatch at its defaults and without activation sampling."""
    import gradwatch

    return {"plain": lambda: [], "plain, again": lambda: [],
            "gradwatch": lambda: [gradwatch.KerasCallback(reporters=[])],
            "gradwatch, activation_every=0": lambda: [gradwatch.KerasCallback(reporters=[], activation_every=0)]}


def _floor():
    """TensorFlow: the least an every-step monitor can cost, as the PyTorch table's *floor*: the L2 norm of every
    gradient, taken in the traced step (an instance wrapper of the optimizer's ``apply``, as gradwatch's) and kept in
    a variable, so nothing of it is pruned; no max |g|, no update ratio, no ring, no flush."""
    import keras
    import tensorflow as tf

    class Floor(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # after make_train_function, before its first trace
            opt = self.model.optimizer
            inner = getattr(opt, "inner_optimizer", opt)
            original = type(inner).apply
            self.norms = tf.Variable(tf.zeros([len(self.model.trainable_variables)]), trainable=False)

            def apply(grads, trainable_variables=None):
                grads = list(grads)
                self.norms.assign(tf.sqrt(2.0 * tf.stack([tf.nn.l2_loss(g) for g in grads])))
                return original(inner, grads, trainable_variables)

            inner.apply = apply

    return Floor()


def bench(rounds: int, only: str = "", copies: int = 1, stepped: bool = False) -> list[dict]:
    """Per model, ``copies`` times over: a fresh copy per variant, ``rounds`` + 1 epochs in turns (see the module's
    docstring). Each copy's figure is its median over epochs; the row gives the median (min..max) over copies.
    ``stepped`` (TensorFlow): the variants take turns from one thread (:func:`_stepped`), not a thread each."""
    import gc

    import keras

    backend = keras.backend.backend()
    if stepped and backend != "tensorflow":
        raise SystemExit(f"--keras-stepped unrolls TensorFlow's fit() loop; this Keras runs on {backend!r}: run it "
                         "with --keras-backend tensorflow")
    variants = _variants()
    if backend == "tensorflow":
        variants["floor"] = lambda: [_floor()]
        variants["TensorBoard(histogram_freq=1)"] = lambda: [keras.callbacks.TensorBoard(
            log_dir=tempfile.mkdtemp(), histogram_freq=1)]
    rows = []
    for label, model, weights, (x, y, loss, bs) in _warmed(only):
        parts = []
        for _ in range(copies):
            gc.collect()  # the last copies' graphs: collected here, not in some variant's timed step
            if backend == "torch":
                parts.append(_eager(label, backend, weights, model, x, y, loss, bs, variants, rounds))
                continue
            if stepped:
                parts.append(_stepped(label, backend, weights, model, x, y, loss, bs, variants, rounds))
                continue
            names = list(variants)
            turns = _Turns(names)
            timers = {v: _timer(v, turns, STEPS, rounds + 1) for v in names}
            _fit_in_turns(label, model, weights, (x, y, loss, bs), rounds + 1, turns,
                          {v: lambda v=v: [_starter(v, turns, timers[v]), *variants[v](), timers[v]] for v in names})
            epochs = {v: timers[v].epochs for v in names}
            first = {v: timers[v].first + sum(epochs[v][0][1:]) for v in names}  # on_train_begin to the epoch's end
            parts.append(_row(label, backend, epochs, first))
        rows.append(parts[0] if copies == 1 else _over_copies(parts))
    return rows


def _over_copies(parts: list[dict]) -> dict:
    """One row from a row per fresh set of copies: each figure's median (min..max) over the copies' medians. Epochs
    of one copy share its lot: in one TensorFlow SimpleRNN run, three copies of the same gradwatch read +4.5%,
    +13.4% and +12.1% a step, each within about 2 points over its epochs."""
    over = {v: [p["overhead"][v][0] for p in parts] for v in parts[0]["overhead"]}
    row = {"model": f"{parts[0]['model']} ({len(parts)} copies)",
           "plain_ms": statistics.median(p["plain_ms"] for p in parts),
           "overhead": {v: (statistics.median(q), min(q), max(q)) for v, q in over.items()}}
    if "start" in parts[0]:
        row["start"] = {v: statistics.median(p["start"][v] for p in parts) for v in parts[0]["start"]}
        row["start_s"] = {v: statistics.median(p["start_s"][v] for p in parts) for v in parts[0]["start_s"]}
    return row


def bench_async(rounds: int, only: str = "") -> list[dict]:
    import keras

    import gradwatch

    class Hook(keras.callbacks.Callback):  # a batch-end hook not marked async-safe, as ProgbarLogger's (verbose=1)
        def on_train_batch_end(self, batch, logs=None):
            pass

    variants: dict[str, Callable[[], list]] = {
        "plain": lambda: [], "plain, again": lambda: [],
        "gradwatch": lambda: [gradwatch.KerasCallback(reporters=[])],
        "gradwatch + a batch-end hook (synchronous)": lambda: [gradwatch.KerasCallback(reporters=[]), Hook()]}
    rows = []
    for label, model, weights, (x, y, loss, bs) in _warmed(only):
        names = list(variants)
        turns = _Turns(names)
        epochs: dict[str, list[float]] = {v: [] for v in names}
        _fit_in_turns(label, model, weights, (x, y, loss, bs), rounds + 1, turns,
                      {v: lambda v=v: [_epoch_turns(v, turns, rounds + 1, epochs[v], first=True), *variants[v](),
                                       _epoch_turns(v, turns, rounds + 1, epochs[v], first=False)]
                       for v in names})
        means = {v: [e / STEPS for e in epochs[v][1:]] for v in names}  # the first epoch holds the fit start
        rows.append(_overhead(f"{label} ({keras.backend.backend()}, verbose=0)", means))
    return rows


def bench_fits(rounds: int, only: str = "") -> list[dict]:
    """Whole ``verbose=0`` fits taking turns from one thread: each round, every variant (the order rotating) fits
    its copy for ``FIT_EPOCHS`` epochs, and the mean step of all but the first is its figure (the first holds
    gradwatch's install and trace, which each fit repeats). No thread per variant: on the JAX MLP the threaded
    harness read plain against plain -4 to -6% in most runs, always the same way (a per-thread or per-copy
    effect). Single fits are noisy here (one round's ratio was up to 45 points off in 16 rounds): take the median
    of many rounds."""
    import keras

    variants = _variants()
    rows = []
    for label, model, weights, (x, y, loss, bs) in _warmed(only):
        names = list(variants)
        copies = {v: _copy(model, weights, loss) for v in names}
        means: dict[str, list[float]] = {v: [] for v in names}
        for r in range(rounds):
            shift = r % len(names)
            for v in names[shift:] + names[:shift]:
                times: list[float] = []
                copies[v].fit(x, y, batch_size=bs, epochs=FIT_EPOCHS, verbose=0, shuffle=False,
                              callbacks=[_epoch_clock(times, first=True), *variants[v](),
                                         _epoch_clock(times, first=False)])
                means[v].append(sum(times[1:]) / (STEPS * (FIT_EPOCHS - 1)))
        rows.append(_overhead(f"{label} ({keras.backend.backend()}, whole fits)", means))
    return rows


def bench_starts(rounds: int, only: str = "") -> list[dict]:
    """The fit start, one fresh fit at a time: each round, every variant (the order rotating) fit()s a new copy of
    the model for one epoch from one thread. Its start is the time from ``on_train_begin`` to the end of the second
    step (install, and every trace and compile: sampled steps' train function runs at step 1, the other at step
    2) beyond two steps at the median step time of the rest of the epoch, as a ratio to plain's in the same round:
    median (min..max) over rounds. :func:`bench` has one first epoch per variant, whose ratio moved by 0.2-0.5x
    from run to run of the same code (plain against plain 0.57-1.23x); and whole epochs here stall now and then
    (50 steps of a median 32 ms took 1.5 to 4.2 s), so the start is not an epoch's difference to another."""
    import keras

    variants = _variants()
    rows = []
    for label, model, weights, (x, y, loss, bs) in _warmed(only):
        names = list(variants)
        starts: dict[str, list[float]] = {v: [] for v in names}
        for r in range(rounds):
            shift = r % len(names)
            for v in names[shift:] + names[:shift]:
                marks: list[float] = []
                _copy(model, weights, loss).fit(
                    x, y, batch_size=bs, epochs=1, verbose=0, shuffle=False,
                    callbacks=[_start_clock(marks, first=True), *variants[v](), _start_clock(marks, first=False)])
                begin, ends = marks[0], marks[1:]
                step = statistics.median(b - a for a, b in zip(ends[1:], ends[2:]))
                starts[v].append(ends[1] - begin - 2 * step)
        ratios = {v: [s / p for s, p in zip(starts[v], starts["plain"])] for v in names[1:]}
        rows.append({"model": f"{label} ({keras.backend.backend()}, fresh fits)",
                     "plain_s": statistics.median(starts["plain"]),
                     "ratio": {v: (statistics.median(q), min(q), max(q)) for v, q in ratios.items()}})
    return rows


def starts_table(rows: list[dict]) -> str:
    """Markdown for :func:`bench_starts`: plain's median start, and each other variant's ratio to it."""
    variants = list(rows[0]["ratio"])
    head = "| model | fit start: plain | " + " | ".join(variants) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [f"{m:.2f}x ({lo:.2f}..{hi:.2f}x)" for m, lo, hi in r["ratio"].values()]
        lines.append(f"| {r['model']} | {r['plain_s']:.2f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _start_clock(marks: list[float], first: bool):
    """First in the callback list: the time of ``on_train_begin``; last: the end of each step, its loss read back,
    once every callback's ``on_train_batch_end`` ran."""
    import keras

    class StartClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if first:
                marks.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            if not first:
                float((logs or {}).get("loss", 0.0))  # the step's loss read back: JAX dispatches asynchronously
                marks.append(time.perf_counter())

    return StartClock()


def _epoch_clock(times: list[float], first: bool):
    """Epoch hooks only (fit() stays asynchronous): first in the list, it starts the clock; last, it stops it once
    every callback's ``on_epoch_end`` ran."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if first:
                times.append(-time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            if not first:
                times[-1] += time.perf_counter()

    return EpochClock()


def _copy(model, weights, loss: str):
    """A variant's copy of ``model``: the same weights, an optimizer of its own."""
    import keras

    keras.utils.set_random_seed(0)
    m = keras.models.clone_model(model)
    m.set_weights(weights)
    m.compile(optimizer=_optimizer(m), loss=loss)
    return m


def _fit_in_turns(label: str, model, weights, fit_data: tuple, epochs: int, turns: _Turns,
                  callbacks: dict[str, Callable[[], list]]) -> None:
    """Each variant's copy of ``model`` (the same weights, an optimizer of its own) fit()s in a thread of its own
    with the callbacks ``callbacks[variant]()`` makes, which take the turns."""
    x, y, loss, bs = fit_data
    errors, threads = [], []
    for v, make in callbacks.items():
        m = _copy(model, weights, loss)
        cbs = make()

        def run(m=m, cbs=cbs, v=v):
            try:
                m.fit(x, y, batch_size=bs, epochs=epochs, verbose=0, shuffle=False, callbacks=cbs)
            except BaseException as exc:  # noqa: BLE001 - reported after the others finish
                errors.append((v, exc))
            finally:
                turns.passed(v, finished=True)

        threads.append(threading.Thread(target=run, name=v))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{label}: {errors}")


def _epoch_turns(name: str, turns: _Turns, epochs: int, times: list[float], first: bool):
    """Epoch hooks only (fit() stays asynchronous): first in the list, it waits for the turn and starts the clock;
    last, it stops the clock once every callback's ``on_epoch_end`` ran and passes the turn on."""
    import keras

    class EpochTurns(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if first:
                turns.arrive(name)

        def on_epoch_begin(self, epoch, logs=None):
            if first:
                if epoch:
                    turns.wait(name)
                times.append(-time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            if not first:
                times[-1] += time.perf_counter()
                if epoch + 1 < epochs:
                    turns.passed(name)

    return EpochTurns()


def _overhead(model: str, means: dict[str, list[float]]) -> dict:
    """A table row from each variant's mean step time per epoch: plain's median and each other variant's ratio to
    plain in the same epoch, median (min..max)."""
    ratios = {v: [m / p - 1 for m, p in zip(ms, means["plain"])] for v, ms in means.items() if v != "plain"}
    return {"model": model, "plain_ms": statistics.median(means["plain"]) * 1e3,
            "overhead": {v: (statistics.median(r), min(r), max(r)) for v, r in ratios.items()}}


def _row(label: str, backend: str, epochs: dict[str, list[list[float]]], first: dict[str, float]) -> dict:
    """A table row from each variant's step times per epoch and its first epoch's whole time."""
    names = list(epochs)
    means = {v: [statistics.fmean(e) for e in epochs[v][1:]] for v in names}
    once = {v: first[v] - len(epochs[v][0]) * statistics.median(means[v]) for v in names}
    return {**_overhead(f"{label} ({backend})", means),
            "start": {v: once[v] / once["plain"] for v in names[1:]}, "start_s": once}


def _from_one_thread(label: str, backend: str, runs: dict, rounds: int, first: dict[str, float]) -> dict:
    """The one-thread harnesses' turns: per variant, ``runs[v]`` is ``(callbacks, epoch)``, where ``epoch(n)`` (called
    before the callbacks' ``on_epoch_begin``) returns ``(step, done)``: ``step(b)`` runs batch ``b`` with its batch
    hooks, ``done()`` (or ``None``) ends the epoch's data before ``on_epoch_end``, untimed. Each step, every variant's
    in turn (the order rotating), each timed whole; the epoch's end is on its last step. ``first[v]``: the install's
    time, before the first epoch (which holds every trace and compile)."""
    names = list(runs)
    times = {v: [[] for _ in range(rounds + 1)] for v in names}
    for n in range(rounds + 1):
        steps = {}
        for v in names:
            cbs, epoch = runs[v]
            steps[v] = epoch(n)
            cbs.on_epoch_begin(n)
        for b in range(STEPS):
            shift = (n * STEPS + b) % len(names)
            for v in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                steps[v][0](b)
                times[v][n].append(time.perf_counter() - t0)
        for v in names:
            if steps[v][1] is not None:
                steps[v][1]()
            t0 = time.perf_counter()
            runs[v][0].on_epoch_end(n, {})
            times[v][n][-1] += time.perf_counter() - t0
    for v in names:
        runs[v][0].on_train_end()
    return _row(label, backend, times, {v: first[v] + sum(times[v][0]) for v in names})


def _eager(label: str, backend: str, weights, model, x, y, loss, bs: int, variants: dict, rounds: int) -> dict:
    """Eager backends: one thread; each step, every variant's ``train_step`` on the same batch in turn (the order
    rotating), its callbacks' hooks around it as in ``fit()``."""
    import keras

    runs, first = {}, {}
    for v in variants:
        m = _copy(model, weights, loss)
        cbs = keras.callbacks.CallbackList(variants[v](), model=m)

        def epoch(n, m=m, cbs=cbs):
            def step(b):
                cbs.on_train_batch_begin(b)
                logs = m.train_step((x[b * bs:(b + 1) * bs], y[b * bs:(b + 1) * bs]))
                cbs.on_train_batch_end(b, {k: float(keras.ops.convert_to_numpy(val)) for k, val in logs.items()})
            return step, None

        runs[v] = (cbs, epoch)
    for v, (cbs, _) in runs.items():
        t0 = time.perf_counter()
        cbs.on_train_begin()
        first[v] = time.perf_counter() - t0  # the install; the eager step itself has nothing to trace
    return _from_one_thread(label, backend, runs, rounds, first)


def _stepped(label: str, backend: str, weights, model, x, y, loss, bs: int, variants: dict, rounds: int) -> dict:
    """TensorFlow, from one thread: ``fit()``'s own loop, unrolled (its epoch iterator, ``make_train_function``,
    the callbacks' hooks, ``train_function`` on the iterator, the loss read back as ``verbose=1`` does), every
    variant's step in turn (the order rotating), each timed whole: its batch hooks, gradwatch's flush, the epoch's
    end on its last step. No thread per variant, no turn to wait for inside a step."""
    import keras
    from keras.src.backend.tensorflow.trainer import TFEpochIterator
    from keras.src.callbacks.callback_list import CallbackList

    runs, first = {}, {}
    for v in variants:
        m = _copy(model, weights, loss)
        it = TFEpochIterator(x=x, y=y, batch_size=bs, shuffle=False, distribute_strategy=m.distribute_strategy,
                             steps_per_execution=m.steps_per_execution)
        m._maybe_symbolic_build(iterator=it)
        it.reset()
        cbs = CallbackList(variants[v](), add_history=True, model=m, epochs=rounds + 1, steps=it.num_batches)
        m.stop_training = False
        t0 = time.perf_counter()
        m.make_train_function()
        cbs.on_train_begin()
        first[v] = time.perf_counter() - t0  # the install; every trace and compile falls in the first epoch

        def epoch(n, m=m, it=it, cbs=cbs):
            m.reset_metrics()
            batches = iter(it)

            def step(b):
                begin, end, iterator = next(batches)
                cbs.on_train_batch_begin(begin)
                logs = m.train_function(iterator)
                float(keras.ops.convert_to_numpy(logs["loss"]))
                cbs.on_train_batch_end(end, logs)

            def done():  # the iterator's end
                for _ in batches:
                    pass
            return step, done

        runs[v] = (cbs, epoch)
    return _from_one_thread(label, f"{backend}, stepped", runs, rounds, first)


def table(rows: list[dict]) -> str:
    """Markdown: the overhead columns, and the fit start's where the rows have it (not ``bench_async``'s)."""
    variants = list(rows[0]["overhead"])
    start = "start" in rows[0]
    head = "| model | plain ms/step | " + " | ".join(variants) + " |"
    if start:
        head += " fit start: plain | " + " | ".join(f"fit start: {v}" for v in variants) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [f"{m * 100:+.1f}% ({lo * 100:+.1f}..{hi * 100:+.1f})" for m, lo, hi in r["overhead"].values()]
        line = f"| {r['model']} | {r['plain_ms']:.2f} | " + " | ".join(cells) + " |"
        if start:
            starts = [f"{r['start_s'][v]:.2f} s ({r['start'][v]:.2f}x)" for v in variants]
            line += f" {r['start_s']['plain']:.2f} s | " + " | ".join(starts) + " |"
        lines.append(line)
    return "\n".join(lines)
