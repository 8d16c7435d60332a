"""LSTConfig: the issue's defaults, JSON round trip, errors that name the field; backbone
checks of get_lst_model (unsupported architectures, layer ranges, widths)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BartConfig, BartModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from kexue.lst import LSTConfig, get_lst_model
from kexue.testing.lst import tiny_bert, tiny_t5
from kexue.testing.lst import token_batch as batch


def test_defaults_are_the_issues():
    c = LSTConfig()
    assert c.reduction_factor == 8
    assert c.side_layers is None
    assert c.gate_temperature == 0.1
    assert c.init == "fisher"
    assert c.fisher_samples == 1024
    assert c.merge_backbone_output is False
    assert c.task == "sequence-classification"


def test_json_round_trip(tmp_path):
    c = LSTConfig(reduction_factor=4, side_layers=[0, 2, 5], init="magnitude", num_labels=3)
    assert LSTConfig.from_json(c.to_json()) == c
    assert LSTConfig.from_dict(c.to_dict()) == c
    # the one file format: the config.json of a saved side network (as PEFT's configs)
    saved = LSTConfig(reduction_factor=4, side_layers=[0, 2], init="magnitude", num_labels=3)
    get_lst_model(tiny_bert(), saved).save_pretrained(tmp_path)
    assert LSTConfig.from_pretrained(tmp_path) == saved


def test_unknown_json_field_is_named():
    with pytest.raises(ValueError, match="reduction"):
        LSTConfig.from_dict({"reduction": 8})


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        ({"reduction_factor": 0}, ValueError, "reduction_factor"),
        ({"reduction_factor": 2.5}, TypeError, "reduction_factor"),
        ({"reduction_factor": True}, TypeError, "reduction_factor"),
        ({"side_layers": []}, ValueError, "side_layers"),
        ({"side_layers": [2, 1]}, ValueError, "side_layers"),
        ({"side_layers": [0, 0]}, ValueError, "side_layers"),
        ({"side_layers": [-1]}, ValueError, "side_layers"),
        ({"side_layers": "0,1"}, TypeError, "side_layers"),
        ({"gate_temperature": 0.0}, ValueError, "gate_temperature"),
        ({"gate_temperature": math.nan}, ValueError, "gate_temperature"),
        ({"gate_temperature": "0.1"}, TypeError, "gate_temperature"),
        ({"init": "l1"}, ValueError, "init"),
        ({"fisher_samples": 0}, ValueError, "fisher_samples"),
        ({"merge_backbone_output": "yes"}, TypeError, "merge_backbone_output"),
        ({"task": "question-answering"}, ValueError, "task"),
        ({"num_labels": 0}, ValueError, "num_labels"),
        ({"pooling": "max"}, ValueError, "pooling"),
        ({"dropout": 1.0}, ValueError, "dropout"),
    ],
)
def test_bad_values_name_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        LSTConfig(**kwargs)


def test_side_layers_out_of_range():
    with pytest.raises(ValueError, match=r"side_layers \[3\] out of range.*3 layers"):
        get_lst_model(tiny_bert(), LSTConfig(side_layers=[0, 3], init="random"))


def test_reduction_factor_must_divide_the_widths():
    with pytest.raises(ValueError, match="reduction_factor=3 must divide"):
        get_lst_model(tiny_bert(), LSTConfig(reduction_factor=3, init="random"))
    # head size 8: r = 16 divides hidden 32? no -> named; r = 8 keeps 1 dim per head
    get_lst_model(tiny_bert(), LSTConfig(reduction_factor=8, init="random"))


def test_fisher_needs_init_data():
    with pytest.raises(ValueError, match="init_data"):
        get_lst_model(tiny_bert(), LSTConfig(init="fisher"))


def test_init_data_must_hold_labels():
    data = [{k: v for k, v in batch().items() if k != "labels"}]
    with pytest.raises(ValueError, match="labels"):
        get_lst_model(tiny_bert(), LSTConfig(reduction_factor=4), init_data=data)


def test_config_type_is_checked():
    with pytest.raises(TypeError, match="LSTConfig"):
        get_lst_model(tiny_bert(), {"reduction_factor": 4})


def test_not_a_transformers_model():
    with pytest.raises(ValueError, match=r"no \.config"):
        get_lst_model(torch.nn.Linear(3, 3), LSTConfig(init="random"))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        get_lst_model("bert-base-uncased", LSTConfig(init="random"))


def test_decoder_only_models_are_refused_with_the_reason():
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=60, n_positions=32))
    with pytest.raises(ValueError, match="causal"):
        get_lst_model(gpt2, LSTConfig(init="random", reduction_factor=4))
    llama = LlamaModel(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=60,
        )
    )
    with pytest.raises(ValueError, match="causal"):
        get_lst_model(llama, LSTConfig(init="random", reduction_factor=4))


def test_other_encoder_decoders_are_refused():
    bart = BartModel(
        BartConfig(
            vocab_size=60,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
        )
    )
    with pytest.raises(ValueError, match=r"'bart' is not supported.*t5"):
        get_lst_model(bart, LSTConfig(init="random", reduction_factor=4))


def test_seq2seq_needs_t5_with_lm_head():
    with pytest.raises(ValueError, match="seq2seq-lm"):
        get_lst_model(tiny_bert(), LSTConfig(task="seq2seq-lm", init="random", reduction_factor=4))
    t5 = tiny_t5()
    model = get_lst_model(t5, LSTConfig(task="seq2seq-lm", init="random", reduction_factor=4))
    assert model.side.decoder is not None


def test_pruning_init_needs_bert_module_names():
    """init='random' works on any encoder that returns hidden states; pruning names what it
    misses."""
    from transformers import DistilBertConfig, DistilBertModel

    distil = DistilBertModel(
        DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    )
    model = get_lst_model(distil, LSTConfig(init="random", reduction_factor=4))
    assert model(**batch()).logits.shape == (4, 2)
    with pytest.raises(ValueError, match=r"encoder\.layer"):
        get_lst_model(distil, LSTConfig(init="magnitude", reduction_factor=4))
