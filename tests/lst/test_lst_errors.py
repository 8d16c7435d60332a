"""Bad input fails at the call, naming the argument: labels outside ``0..num_labels-1`` in the
forward pass and in the Fisher pass, and a missing extra on import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kexue.exceptions import MissingExtraError
from kexue.lst import (
    BackboneCache,
    Encoded,
    LSTConfig,
    LSTModel,
    PooledClassifier,
    TrainSettings,
    build_text_classifier,
    get_lst_model,
    train_text_classifier,
)
from kexue.testing.lst import VOCAB, seq2seq_batch, tiny_bert, tiny_t5, token_batch


def _bad_labels(value: int = 5) -> dict[str, torch.Tensor]:
    batch = token_batch()
    batch["labels"] = torch.tensor([0, 1, value, 0])
    return batch


@pytest.mark.parametrize("bad", [5, -1, 2])
def test_forward_names_num_labels_and_the_bad_label(bad):
    model = get_lst_model(tiny_bert(), LSTConfig(reduction_factor=4, init="random"))
    with pytest.raises(ValueError, match=rf"num_labels=2\).*got {bad}$"):
        model(**_bad_labels(bad))


def test_fisher_pass_names_num_labels_and_the_bad_label():
    config = LSTConfig(reduction_factor=4, init="fisher", num_labels=3, fisher_samples=4)
    with pytest.raises(ValueError, match=r"labels of init_data .*num_labels=3\).*got 5"):
        get_lst_model(tiny_bert(), config, init_data=[_bad_labels(5)])
    token = LSTConfig(reduction_factor=4, task="token-classification", num_labels=3)
    batch = token_batch()
    labels = torch.zeros_like(batch["input_ids"])
    labels[1, 2] = 4
    with pytest.raises(ValueError, match=r"num_labels=3\).*got 4"):
        get_lst_model(tiny_bert(), token, init_data=[{**batch, "labels": labels}])


def test_seq2seq_labels_beyond_the_vocabulary():
    batch = seq2seq_batch()
    batch["labels"][1, 1] = VOCAB + 3
    config = LSTConfig(reduction_factor=4, init="random", task="seq2seq-lm")
    model = get_lst_model(tiny_t5(), config)
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}\).*got {VOCAB + 3}"):
        model(**batch)
    fisher = LSTConfig(reduction_factor=4, task="seq2seq-lm", fisher_samples=4)
    with pytest.raises(ValueError, match="vocab_size"):
        get_lst_model(tiny_t5(), fisher, init_data=[batch])


def test_baseline_classifier_names_num_labels():
    model = PooledClassifier(tiny_bert(), 2)
    with pytest.raises(ValueError, match=r"num_labels=2\).*got 5"):
        model(**_bad_labels(5))


def test_public_entry_points_check_their_types():
    model = get_lst_model(tiny_bert(), LSTConfig(reduction_factor=4, init="random"))
    data = Encoded([[2, 5, 3]], torch.tensor([0]))
    with pytest.raises(TypeError, match="settings"):
        train_text_classifier(model, data, {"epochs": 1})
    with pytest.raises(TypeError, match="data"):
        train_text_classifier(model, [[2, 5, 3]], TrainSettings())
    with pytest.raises(ValueError, match="warmup"):
        TrainSettings(warmup=1.5)
    with pytest.raises(TypeError, match="model must be an LSTModel"):
        BackboneCache(tiny_bert(), [])
    with pytest.raises(TypeError, match="pretrained_directory"):
        LSTModel.from_pretrained(tiny_bert(), 3)
    with pytest.raises(TypeError, match="config must be an LSTConfig"):
        get_lst_model(tiny_bert(), {"reduction_factor": 4})


def test_import_without_transformers_is_one_line_naming_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from kexue.exceptions import MissingExtraError\n"
        "try:\n"
        "    import kexue.lst\n"
        "except MissingExtraError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "kexue.lst needs transformers, which is not installed: pip install 'kexue[lst]'"
    )


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError, match=r"needs peft.*pip install 'kexue\[lst\]'"):
        build_text_classifier("lora", tiny_bert(), 2)


def test_cli_without_transformers_exits_2_with_one_line():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from kexue.cli import main\n"
        "main(['lst', 'train', '--backbone', 'm', '--data', sys.argv[1], '--eval', sys.argv[1],"
        " '--out', '/tmp/x'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, __file__], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'kexue[lst]'" in lines[0], out.stderr
