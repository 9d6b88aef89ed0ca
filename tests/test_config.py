import pytest

from pogdiff.config import ConfigError, GradMode, Method, load_config


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\nmethod:\n  name: cbdm\n")
    cfg = load_config(p, ["train.lr=1e-4", "method.grad_mode=stop", "data.profile=agedb-l"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.name is Method.cbdm
    assert cfg.method.grad_mode is GradMode.stop
    assert cfg.data.profile == "agedb-l"


def test_demo_config_loads():
    cfg = load_config("configs/demo.yaml")
    assert cfg.model.name == "tiny-base"  # the demo fine-tunes the committed pretrained base


@pytest.mark.parametrize(
    "override, expected",
    [("train.lrr=1", "did you mean 'train.lr'"), ("trian.lr=1", "did you mean 'train.lr'"),
     ("method.psi_imgg=false", "did you mean 'method.psi_img'")],
)
def test_unknown_key_names_key_and_closest(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value)
    assert expected in str(e.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stpes: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.stpes.*did you mean 'train.steps'"):
        load_config(p)


@pytest.mark.parametrize("override, declared", [
    ("train.steps=many", "(expected int)"), ("train.lr=fast", "(expected float)"), ("dist.use_gpu=maybe", "(expected bool)"),
    ("dist.ray_address=[1]", "(expected Optional[str])"), ("train=3", "the section train"),
])
def test_wrong_type_names_field_and_its_declared_type(override, declared, tmp_path):
    """The field's own type, never the section's class (it said "expected <class TrainConfig>")."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert override.split("=")[0] in msg and declared in msg and "<class" not in msg, msg
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*train.batch_size.*\(expected int\)"):
        load_config(p)


def test_bad_enum_value_lists_choices():
    with pytest.raises(ConfigError, match=r"method.name.*pogdiff"):
        load_config(None, ["method.name=pogdif"])


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])


def test_value_constraints():
    with pytest.raises(ConfigError, match="loss_backend"):
        load_config(None, ["train.loss_backend=cuda"])


@pytest.mark.parametrize("override,key", [
    ("train.steps=-5", "train.steps"), ("method.a1=-1", "method.a1"), ("train.caption_dropout=2", "train.caption_dropout"),
    ("train.lr=nan", "train.lr"), ("train.log_every=0", "train.log_every"), ("data.image_size=7", "data.image_size"),
    ("method.a2=inf", "method.a2"), ("density.epochs=0", "density.epochs"), ("train.adam_beta2=1.5", "train.adam_beta2"),
    ("sample.images_per_id=1", "sample.images_per_id"),
])
def test_every_value_is_constrained_at_load(override, key, capsys):
    from pogdiff.cli import main

    assert main(["config", "configs/demo.yaml", override]) == 2
    err = capsys.readouterr().err
    assert key in err and "outside" in err or "multiple of" in err, err


def test_more_synthetic_identities_than_the_generator_names_exit_2_before_anything_starts(capsys):
    """It used to fail in a prepare worker once the pipeline reached identity 184,789 (after ~30 minutes at 10^6)."""
    from pogdiff.cli import main

    assert main(["prepare", "configs/demo.yaml", "data.profile=custom", "data.majority_ids=20000",
                 "data.minority_ids=200000"]) == 2
    err = capsys.readouterr().err
    assert "data.majority_ids + data.minority_ids = 220000" in err and "184788" in err, err
