"""Every example runs as a user would run it, shows the finding, tries gradwatch's fixes with gradwatch.trial and
shows the cure.

Each classic-case example exits with status 1 when the recommended fix is not the expected one or does not
remove the problem, so these tests check the outcome, not only that the script ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

pytestmark = [pytest.mark.torch, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = {
    "deep_relu_he_init.py": ("he_init", "vanishing"),
    "plain_cnn_batch_norm.py": ("batch_norm", "vanishing"),
    "tanh_rnn_to_lstm.py": ("gated_rnn", "vanishing"),
    "rnn_gradient_clipping.py": ("gradient_clipping", "exploding"),
    # Step 3: every value finite, the norms overflow float32 (exploding, a step before the NaN); step 4: NaN.
    "huge_lr_lower_lr.py": ("lower_learning_rate", "exploding, nonfinite"),
}


def run_example(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, cwd=EXAMPLES,
                          timeout=600)


@pytest.mark.parametrize("name", sorted(CASES))
def test_classic_case_example(name):
    fix, kind = CASES[name]
    out = run_example(name)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"problems: {kind}" in out.stdout  # the sick run shows the finding
    assert "gradwatch.trial: each fix on a fresh model" in out.stdout  # the cure is shown by trial, not by hand
    assert f"Best fix: {fix}, recommendation " in out.stdout
    verdict = next(line for line in out.stdout.splitlines() if line.startswith("After the fix: "))
    assert kind in verdict and verdict.endswith("gone; training improved. OK"), verdict


def test_examples_are_all_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(CASES) | {"quickstart.py"}


def test_quickstart():
    out = run_example("quickstart.py")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vanishing" in out.stdout
    assert "gradwatch.trial: the top fixes" in out.stdout
    assert "best fix: " in out.stdout and "healthy: True" in out.stdout
