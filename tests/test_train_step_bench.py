"""benchmarks/train_step.py: the SD v1.5 config is the published UNet, and the CPU run emits its JSON."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the runs below pass --threads 1 (a busy 2-core box thrashes with 2)


def test_sd15_config_is_the_859m_unet(bench):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == bench.SD15_UNET_PARAMS == 859_520_964


def test_cpu_tiny_run_emits_ratios_only(bench, tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--config", "tiny", "--device", "cpu", "--threads", "1", "--batch-size", "2", "--reps", "2", "--steps", "1",
                         "--warmup", "0", "--dataset-size", "16", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result) >= {"machine", "setup", "levers", "methods"}
    assert result["levers"] == {"attention": "sdpa", "channels_last": False, "compile": False, "loss_backend": "auto",
                                "precomputed": True, "overlap_data": True, "host_sync": False}
    methods = result["methods"]
    assert list(methods) == ["vanilla", "pogdiff_stop", "pogdiff_full", "cbdm"]
    for entry in methods.values():
        assert "step_time_s" not in entry and "mfu" not in entry  # no absolute claims off a GPU
        r = entry["step_time_ratio_to_vanilla"]
        assert 0 < r["min"] <= r["median"] <= r["max"]
    assert methods["vanilla"]["step_time_ratio_to_vanilla"]["median"] == 1.0
    # counted FLOPs: the split no_grad y' forward adds one forward (~4/3); [y; y'] with gradients doubles
    assert methods["pogdiff_stop"]["flops_ratio_to_vanilla"] == pytest.approx(4 / 3, abs=0.01)
    assert methods["pogdiff_full"]["flops_ratio_to_vanilla"] == pytest.approx(2.0, abs=1e-6)
    assert methods["cbdm"]["flops_ratio_to_vanilla"] == pytest.approx(2.0, abs=1e-6)


def test_levers_off_the_default_path_run(bench):
    result = bench.main(["--config", "tiny", "--device", "cpu", "--threads", "1", "--batch-size", "2", "--reps", "1", "--steps", "1",
                         "--warmup", "0", "--dataset-size", "16", "--methods", "vanilla,pogdiff_stop_concat",
                         "--no-precomputed", "--no-overlap-data", "--host-sync", "--channels-last"])
    assert result["levers"]["precomputed"] is False and result["levers"]["channels_last"] is True
    # stop through one concatenated call pays the full 2x (the frozen text encoder runs on y and y' inside the
    # step, as in training; its forward is a small share of the UNet's)
    assert result["methods"]["pogdiff_stop_concat"]["flops_ratio_to_vanilla"] == pytest.approx(2.0, rel=0.01)
