"""Paths before anything reaches Ray: absolute against the user's directory, URIs untouched, and the
source checkout kept off Ray workers' import path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pogdiff.config import ConfigError
from pogdiff.dist.cluster import storage_path
from pogdiff.runs import RunFiles, load_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_relative_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(ROOT / "configs/demo.yaml", ["data.source=data/m.jsonl", "prepare.output=prep",
                                                      "dist.storage_path=shared/ray"])
    assert cfg.output_dir == str(tmp_path / "runs") and RunFiles(cfg).method.is_relative_to(tmp_path / "runs")
    assert cfg.data.source == str(tmp_path / "data" / "m.jsonl") and cfg.prepare.output == str(tmp_path / "prep")
    assert storage_path(cfg) == str(tmp_path / "shared" / "ray")
    # keywords and hub ids stay as they are
    plain = load_run_config(ROOT / "configs/demo.yaml", ["model.name=tiny"])
    assert plain.data.source == "synthetic" and plain.model.name == "tiny" and plain.eval.encoder == "recognizer"


@pytest.mark.parametrize("uri", ["s3://bucket/pogdiff/ray", "gs://bucket/x"])
def test_storage_uris_reach_ray_unchanged(uri):
    cfg = load_run_config(ROOT / "configs/demo.yaml", [f"dist.storage_path={uri}"])
    assert cfg.dist.storage_path == uri and storage_path(cfg) == uri


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.dataloader_num_workers"):
        load_run_config(None, ["data.dataloader_num_workers=-1"])
    with pytest.raises(ConfigError, match="train.lr_scheduler='nope'"):
        load_run_config(None, ["train.lr_scheduler=nope"])
    with pytest.raises(ConfigError, match="eval.encoder='tiny'"):
        load_run_config(None, ["eval.encoder=tiny"])
    with pytest.raises(ConfigError, match="unknown config key 'dist.fail_at_step'"):  # test hooks are not config
        load_run_config(None, ["dist.fail_at_step=3"])


def test_a_checkout_on_the_import_path_shadows_no_other_package(tmp_path, monkeypatch):
    """Ray puts the driver's cwd on every worker's sys.path, and `python -c` puts it first: from the
    repository root, no folder of the checkout but pogdiff/ may be importable (a top-level kernels/
    once shadowed PyPI's `kernels`, which transformers imports)."""
    import ray

    from pogdiff.dist.cluster import connect

    monkeypatch.chdir(ROOT)
    importable = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py")
    assert importable == ["pogdiff"], importable
    started = connect(num_cpus=1)
    try:
        @ray.remote(num_cpus=1)
        def probe() -> tuple[bool, str, str]:
            import importlib.util

            import pogdiff.kernels

            spec = importlib.util.find_spec("kernels")
            on_path = any(Path(p or ".").resolve() == ROOT for p in sys.path)
            return on_path, (spec.origin or "") if spec else "", pogdiff.kernels.__file__

        on_path, kernels, ours = ray.get(probe.remote())
        assert on_path, "Ray did not put the checkout on the path: this test shows nothing"
        assert not kernels or Path(kernels).parent.parent != ROOT, kernels  # PyPI's, or none
        assert ours.startswith(str(ROOT / "pogdiff" / "kernels")), ours
    finally:
        if started:
            ray.shutdown()


def test_keywords_stay_keywords_even_where_a_folder_has_their_name(tmp_path, monkeypatch):
    for name in ("tiny", "synthetic", "recognizer"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(str(ROOT / "configs/demo.yaml"), ["eval.encoder=recognizer", "model.name=tiny"])
    assert (cfg.model.name, cfg.data.source, cfg.data.image_encoder, cfg.eval.encoder) == \
        ("tiny", "synthetic", "tiny", "recognizer")
    (tmp_path / "tiny-base").mkdir()
    assert load_run_config(str(ROOT / "configs/demo.yaml"), []).model.name == str(ROOT / "pogdiff" / "models" / "tiny_base")
    assert load_run_config(str(ROOT / "configs/demo.yaml"), ["model.name=./tiny"]).model.name == str(tmp_path / "tiny")


def test_run_folders_name_the_pogdiff_settings_that_differ_from_the_defaults():
    """Variants of one experiment that differ in a2, a3 or k never share a folder (issue 31's a2x16)."""
    from pogdiff.config import load_config, variant_config
    from pogdiff.runs import method_tag

    cfg = load_config(None, ["output_dir=/nonexistent"])
    assert method_tag(variant_config(cfg, "pogdiff", 0)) == "pogdiff-full-seed0"
    assert method_tag(variant_config(cfg, "pogdiff-a2x16", 0)) == "pogdiff-full-a2x16-seed0"
    assert method_tag(variant_config(load_config(None, ["method.k=5", "method.a3=4"]), "pogdiff", 1)) == \
        "pogdiff-full-a3x4-k5-seed1"
