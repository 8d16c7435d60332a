"""One save/load convention for every saveable object of kexue.lst: the side network
(``LSTModel``) and the full / LoRA baselines (``PooledClassifier``). Reload is bit-identical;
a corrupted, incomplete or foreign folder is refused."""

from __future__ import annotations

import json

import pytest
import torch

from kexue.exceptions import CheckpointError
from kexue.lst import (
    LSTConfig,
    LSTModel,
    PooledClassifier,
    build_text_classifier,
    get_lst_model,
    load_text_classifier,
)
from kexue.testing.lst import tiny_bert, token_batch


def _trained(kind: str):
    """A model of ``kind`` after two AdamW steps (so nothing is at its initial value)."""
    gen = torch.Generator().manual_seed(0)
    if kind == "lst":
        model = get_lst_model(tiny_bert(), LSTConfig(reduction_factor=4, init="magnitude"))
    else:
        model = build_text_classifier(kind, tiny_bert(), 2, generator=gen)
    inputs = token_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    return model.eval(), inputs


def _load(kind: str, folder):
    cls = LSTModel if kind == "lst" else PooledClassifier
    return cls.from_pretrained(tiny_bert(), folder)


KINDS = ["lst", "full", "lora"]
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


@pytest.mark.parametrize("kind", KINDS)
def test_reload_is_bit_identical(kind, tmp_path):
    model, inputs = _trained(kind)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_kexue_class"] in ("kexue.lst.LSTModel", "kexue.lst.PooledClassifier")
    assert config["_kexue_format_version"] == 1 and len(config["_sha256"]) == 1
    for loaded in (_load(kind, tmp_path), load_text_classifier(tmp_path, tiny_bert())):
        assert type(loaded) is type(model) and not loaded.training
        state, saved = loaded.state_dict(), model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_lora_saves_only_what_trained(tmp_path):
    model, _ = _trained("lora")
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "classifier.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and any("lora_A" in k for k in saved)
    assert "head.weight" in saved


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupted_or_incomplete_folder_is_refused(kind, tmp_path):
    model, _ = _trained(kind)
    model.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        _load(kind, tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        _load(kind, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_text_classifier(tmp_path, tiny_bert())


def test_a_folder_of_the_other_class_is_refused(tmp_path):
    lst, _ = _trained("lst")
    lst.save_pretrained(tmp_path / "lst")
    full, _ = _trained("full")
    full.save_pretrained(tmp_path / "full")
    with pytest.raises(CheckpointError, match=r"not a kexue\.lst\.PooledClassifier"):
        PooledClassifier.from_pretrained(tiny_bert(), tmp_path / "lst")
    with pytest.raises(CheckpointError, match=r"not a kexue\.lst\.LSTModel"):
        LSTModel.from_pretrained(tiny_bert(), tmp_path / "full")
    with pytest.raises(FileNotFoundError):
        load_text_classifier(tmp_path / "none", tiny_bert())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lst_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="earlier kexue"):
        LSTModel.from_pretrained(tiny_bert(), tmp_path / "old")


def test_baselines_refuse_another_architecture(tmp_path):
    model, _ = _trained("lora")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_layers"):
        PooledClassifier.from_pretrained(tiny_bert(layers=2), tmp_path)
    with pytest.warns(UserWarning, match="checksum"):
        PooledClassifier.from_pretrained(tiny_bert(seed=1), tmp_path)


def test_loading_leaves_the_global_generator_alone(tmp_path):
    model, _ = _trained("lst")
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    backbone = tiny_bert()
    torch.manual_seed(123)
    LSTModel.from_pretrained(backbone, tmp_path)
    assert torch.equal(torch.rand(3), expected)
