"""What a fresh install must give: light `import gradwatch`, every framework present in CI, exported names."""

import os
import subprocess
import sys

import pytest

import gradwatch


def test_import_loads_no_framework():
    code = ("import sys, gradwatch; heavy = [m for m in ('torch', 'tensorflow', 'keras', 'wandb', 'matplotlib') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_top_level_integrations_module():
    out = subprocess.run([sys.executable, "-c", "import integrations"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(gradwatch.__file__)) + "/..")
    assert out.returncode != 0
    import gradwatch.integrations as gi

    assert gi.__name__ == "gradwatch.integrations"


@pytest.mark.skipif(not os.environ.get("CI"), reason="outside CI a framework may be missing on purpose")
@pytest.mark.parametrize("module", ["torch", "tensorflow", "keras", "wandb", "matplotlib"])
def test_backends_installed(module):
    """In CI every optional framework must import, so no test is skipped silently (einops' guard)."""
    __import__(module)


def test_exported_members():
    exported = set(gradwatch.__all__)
    public = {n for n in dir(gradwatch) if not n.startswith("_")} | {"KerasCallback", "__version__"}
    assert exported <= public
    for name in ("attach", "load", "Report", "Finding", "Recommendation", "KerasCallback", "Thresholds",
                 "GradwatchError", "AttachError", "MonitoringError", "LogError", "Reporter", "Watcher"):
        assert name in exported


def test_missing_extra_names_its_install_command(monkeypatch):
    from gradwatch._optional import require

    monkeypatch.setitem(sys.modules, "definitely_not_here_pkg", None)
    with pytest.raises(ImportError, match=r"pip install 'gradwatch\[wandb\]'"):
        require("definitely_not_here_pkg", extra="wandb", feature="WandbReporter")
