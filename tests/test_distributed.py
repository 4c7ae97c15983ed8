"""DDP, FSDP2 and HSDP on real processes (torch.multiprocessing, gloo at 127.0.0.1, CPU).

Every rank trains the same model from the same init on its share of the same data (tests/fixtures/distributed.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
if not torch.distributed.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)

import gradwatch  # noqa: E402
from tests.fixtures import distributed  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def rms(result) -> np.ndarray:
    return np.asarray(result["grad_rms"], dtype=np.float64)


def test_ddp_reports_on_rank_zero_only_without_extra_collectives(tmp_path):
    results = distributed.run(str(tmp_path / "run"), "ddp", options={"reporters": ["console"],
                                                                     "log_dir": str(tmp_path / "log")})
    zero, one = results
    assert "gradwatch" in zero["stdout"] and "healthy" in zero["stdout"]
    assert one["stdout"] == ""  # rank 1 prints nothing...
    np.testing.assert_array_equal(rms(zero), rms(one))  # ...but measured the same all-reduced gradients
    assert zero["report"]["healthy"] and one["report"]["healthy"]
    assert zero["gathers"] == one["gathers"] == 0
    assert zero["layers"] == ["0", "2", "4"]  # the user's names, not DDP's "module.0"
    assert sorted(os.listdir(tmp_path / "log")) and not any(n.startswith("rank-") for n in os.listdir(tmp_path / "log"))
    assert gradwatch.load(tmp_path / "log").step == 30


def test_all_ranks_report_each_into_its_own_log_dir(tmp_path):
    results = distributed.run(str(tmp_path / "run"), "ddp", options={"reporters": ["console"], "all_ranks": True,
                                                                     "log_dir": str(tmp_path / "log")})
    assert all("gradwatch" in r["stdout"] for r in results)
    assert sorted(os.listdir(tmp_path / "log")) == ["rank-0", "rank-1"]
    for r in range(2):
        assert gradwatch.load(tmp_path / "log" / f"rank-{r}").step == 30


def test_fsdp2_figures_equal_ddp_with_one_collective_per_measured_step(tmp_path):
    options = {"reporters": ["console"], "update_every": 5}
    ddp = distributed.run(str(tmp_path / "ddp"), "ddp", options=options)
    fsdp = distributed.run(str(tmp_path / "fsdp"), "fsdp2", options=options)
    for rank in fsdp:
        np.testing.assert_allclose(rms(rank), rms(ddp[0]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(rank["grad_max"], float), np.asarray(ddp[0]["grad_max"], float),
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(rank["update_ratio"], float),
                                   np.asarray(ddp[0]["update_ratio"], float), rtol=1e-4)
        assert rank["gathers"] == rank["collected"] == 30
    assert fsdp[0]["report"]["healthy"] and fsdp[1]["report"]["healthy"]
    assert "healthy" in fsdp[0]["stdout"] and fsdp[1]["stdout"] == ""
    assert any("FSDP2" in n for n in fsdp[0]["report"]["notes"])


def test_hsdp_gathers_over_the_shard_dimension_only(tmp_path):
    ddp = distributed.run(str(tmp_path / "ddp"), "ddp", world=4, options={"reporters": []})
    hsdp = distributed.run(str(tmp_path / "hsdp"), "hsdp", world=4, options={"reporters": []})
    for rank in hsdp:  # reducing over all 4 ranks would double every square: RMS off by sqrt(2)
        np.testing.assert_allclose(rms(rank), rms(ddp[0]), rtol=1e-5)
        assert rank["gathers"] == 30


def test_fsdp2_finds_the_same_vanishing_layers_as_ddp(tmp_path):
    options = {"reporters": []}
    ddp = distributed.run(str(tmp_path / "ddp"), "ddp", options=options, model_kind="sigmoid", steps=60)
    fsdp = distributed.run(str(tmp_path / "fsdp"), "fsdp2", options=options, model_kind="sigmoid", steps=60)

    def verdict(r):
        return [(f["kind"], tuple(f["layers"]), f["step"]) for f in r["report"]["findings"]]

    assert any(k == "vanishing" for k, _, _ in verdict(ddp[0]))
    assert verdict(fsdp[0]) == verdict(fsdp[1]) == verdict(ddp[0])


def test_fsdp1_with_orig_params_gives_ddp_figures_and_without_says_why_not(tmp_path):
    options = {"reporters": [], "update_every": 5}
    ddp = distributed.run(str(tmp_path / "ddp"), "ddp", options=options)
    fsdp1 = distributed.run(str(tmp_path / "fsdp1"), "fsdp1", options=options)
    for rank in fsdp1:  # each rank holds a flat slice of every weight, empty for some: summed over the shards
        np.testing.assert_allclose(rms(rank), rms(ddp[0]), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(rank["update_ratio"], float),
                                   np.asarray(ddp[0]["update_ratio"], float), rtol=1e-4)
        assert rank["layers"] == ["_fsdp_wrapped_module.0", "_fsdp_wrapped_module.2", "_fsdp_wrapped_module.4"]
    flat = distributed.run(str(tmp_path / "flat"), "fsdp1_flat", options=options)
    np.testing.assert_array_equal(rms(flat[0]), rms(flat[1]))
    assert any("use_orig_params=True) for per-layer figures" in n for n in flat[0]["report"]["notes"])


def test_hf_trainer_under_ddp_reports_on_the_main_process_only(tmp_path):
    pytest.importorskip("transformers")
    zero, one = distributed.run_hf(str(tmp_path))
    assert zero["world"] == one["world"] == 2 and zero["step"] == one["step"] == 4
    assert "gradwatch" in zero["stdout"] and "gradwatch" not in one["stdout"]
    np.testing.assert_array_equal(rms(zero), rms(one))  # the all-reduced gradients, measured on both ranks
    assert zero["healthy"] and one["healthy"]
