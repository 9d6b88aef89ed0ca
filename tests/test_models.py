import pytest
import torch

from pogdiff.config import ModelConfig
from pogdiff.models.components import ModelLoadError, build_tiny, encode_text, load_components
from pogdiff.models.components import save_components


def test_tiny_components_are_real_sd_classes_and_tokenize_names():
    c = build_tiny(0)
    tok = c.tokenizer(["An image of lukas brandt."])
    tokens = c.tokenizer.convert_ids_to_tokens(tok.input_ids[0])
    assert "lukas</w>" in tokens and "brandt</w>" in tokens
    hidden, pooled = encode_text(c, ["An image of lukas brandt.", "An image of mira okafor."], torch.device("cpu"))
    assert hidden.shape[0] == 2 and hidden.shape[-1] == c.unet.config.cross_attention_dim
    assert not torch.allclose(pooled[0], pooled[1])
    x = torch.randn(2, 4, 16, 16)
    assert c.unet(x, torch.tensor([1, 500]), encoder_hidden_states=hidden).sample.shape == x.shape


def test_local_directory_round_trip(tmp_path):
    c = build_tiny(3)
    save_components(c, tmp_path / "m")
    c2 = load_components(ModelConfig(name=str(tmp_path / "m")))
    for (k, v), (k2, v2) in zip(c.unet.state_dict().items(), c2.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert c2.tokenizer("lukas").input_ids == c.tokenizer("lukas").input_ids


def test_partial_directory_lists_what_is_missing(tmp_path):
    c = build_tiny(0)
    save_components(c, tmp_path / "m")
    import shutil

    shutil.rmtree(tmp_path / "m" / "vae")
    (tmp_path / "m" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_components(ModelConfig(name=str(tmp_path / "m")))
    assert "vae/" in str(e.value) and "scheduler/scheduler_config.json" in str(e.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(ModelConfig(name="./no/such/dir"))


def test_tiny_tokenizer_ids_identical_across_processes():
    """Token ids feed the text encoder's embedding rows: a rebuilt tiny model must match exactly."""
    import os
    import subprocess
    import sys

    code = ("from pogdiff.models.components import build_tiny_tokenizer; from pogdiff.data.synthetic import vocabulary; "
            "t = build_tiny_tokenizer(vocabulary()); print(t('An image of hanna zeller, blonde spiky hair.').input_ids, len(t))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1, outs
    ids = eval(outs.pop().rsplit("]", 1)[0] + "]")
    assert len(ids) == 2 + 10  # bos, 8 words and 2 punctuation marks as one token each, eos
