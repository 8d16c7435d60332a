"""LSTModel on tiny random BERT and T5 backbones: what trains, what never sees autograd,
gates at 0.5, exact save/load, caching, the tasks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import ModelOutput

from kexue.lst import BackboneCache, LSTConfig, LSTModel, get_lst_model
from kexue.testing.lst import seq2seq_batch, tiny_bert, tiny_t5
from kexue.testing.lst import token_batch as batch

CASES = {
    "bert": (tiny_bert, batch, LSTConfig(reduction_factor=4, init="magnitude")),
    "t5-seq2seq": (
        tiny_t5,
        seq2seq_batch,
        LSTConfig(reduction_factor=4, init="magnitude", task="seq2seq-lm"),
    ),
    "t5-gated-seq2seq": (
        lambda: tiny_t5(gated=True),
        seq2seq_batch,
        LSTConfig(reduction_factor=4, init="random", task="seq2seq-lm"),
    ),
    "t5-classify": (tiny_t5, batch, LSTConfig(reduction_factor=4, init="magnitude")),
}


def build(case: str) -> tuple[LSTModel, dict]:
    make_backbone, make_batch, config = CASES[case]
    return get_lst_model(make_backbone(), config, generator=torch.Generator().manual_seed(0)), (
        make_batch()
    )


@pytest.mark.parametrize("case", list(CASES))
def test_only_side_parameters_train(case):
    model, _ = build(case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    side = {f"side.{n}" for n, _ in model.side.named_parameters()}
    assert trainable == side
    assert not any(p.requires_grad for p in model.backbone.parameters())
    n_train, n_all = model.get_nb_trainable_parameters()
    assert n_train == sum(p.numel() for p in model.side.parameters())
    assert n_all == n_train + sum(p.numel() for p in model.backbone.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_gates_start_at_one_half(case):
    model, _ = build(case)
    for name, gates in model.gate_values().items():
        assert torch.equal(gates, torch.full_like(gates, 0.5)), name
        stack = model.side.stacks()[name]
        assert torch.equal(stack.alpha, torch.zeros_like(stack.alpha))
        assert stack.temperature == 0.1


# Modules returning a ModelOutput (the whole model, the encoder stack) cannot carry backward
# hooks; their layers, attention and linear modules do, and the graph walk covers the rest.
@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
@pytest.mark.parametrize("case", list(CASES))
def test_backward_never_touches_the_backbone(case):
    """Backward hooks on every backbone module never fire; the loss's autograd graph holds no
    backbone parameter; every backbone output is created without autograd history."""
    model, inputs = build(case)
    fired, outputs_with_grad = [], []
    handles = []
    for name, module in model.backbone.named_modules():
        handles.append(
            module.register_full_backward_hook(lambda m, gi, go, name=name: fired.append(name))
        )

        def record(m, args, out, name=name):
            if isinstance(out, torch.Tensor):
                tensors = [out]
            elif isinstance(out, ModelOutput):
                tensors = list(out.values())
            else:
                tensors = list(out) if isinstance(out, tuple | list) else []
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    outputs_with_grad.append(name)

        handles.append(module.register_forward_hook(record))
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    for h in handles:
        h.remove()
    assert fired == []
    assert outputs_with_grad == []
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.side.parameters() if p.requires_grad)

    backbone_ids = {id(p) for p in model.backbone.parameters()}
    seen, stack = set(), [loss.grad_fn]
    leaves = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    assert leaves, "the graph must reach the side parameters"
    assert not any(id(v) in backbone_ids for v in leaves)


def test_the_hook_method_does_detect_backward_through_the_backbone():
    """Control for the test above: with gradients on, the same hooks fire."""
    backbone = tiny_bert()
    fired = []
    layer = backbone.encoder.layer[0]
    layer.register_full_backward_hook(lambda m, gi, go: fired.append(1))
    layer.attention.self.query.weight.requires_grad_(True)
    inputs = batch()
    out = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    out.last_hidden_state.sum().backward()
    assert fired


def test_backbone_states_carry_no_history():
    model, inputs = build("bert")
    states = model.backbone_states(inputs["input_ids"], inputs["attention_mask"])
    assert not states.encoder.requires_grad and states.encoder.grad_fn is None


@pytest.mark.parametrize("case", list(CASES))
def test_backbone_unchanged_after_training_steps(case):
    model, inputs = build(case)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {k: v.clone() for k, v in model.side.state_dict().items()}
    # A PEFT user passes model.parameters(): weight decay must not move the frozen weights.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    assert not model.backbone.training
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, side_before[k]) for k, v in model.side.state_dict().items())


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_gives_bit_identical_logits(case, tmp_path):
    model, inputs = build(case)
    opt = torch.optim.AdamW(model.side.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "side_network.safetensors",
    ]
    saved = load_file(str(tmp_path / "side_network.safetensors"))
    assert set(saved) == set(model.side.state_dict())  # only the side network
    meta = json.loads((tmp_path / "config.json").read_text())
    assert LSTConfig.from_dict(meta["lst_config"]) == model.config

    fresh_backbone = CASES[case][0]()  # same seed: same weights, a different object
    loaded = LSTModel.from_pretrained(fresh_backbone, tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert torch.equal(got, expected)


def test_load_refuses_another_architecture(tmp_path):
    model, _ = build("bert")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_layers"):
        LSTModel.from_pretrained(tiny_bert(layers=2), tmp_path)
    with pytest.warns(UserWarning, match="checksum"):
        LSTModel.from_pretrained(tiny_bert(seed=1), tmp_path)
    with pytest.raises(FileNotFoundError):
        LSTModel.from_pretrained(tiny_bert(), tmp_path / "nothing")


def test_merge_and_unload_raises_a_clear_error():
    model, _ = build("bert")
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    assert model.get_base_model() is model.backbone


def test_print_trainable_parameters(capsys):
    model, _ = build("bert")
    model.print_trainable_parameters()
    n_train, n_all = model.get_nb_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == (
        f"trainable params: {n_train:,d} || all params: {n_all:,d} || "
        f"trainable%: {100 * n_train / n_all:.4f}"
    )


def test_output_is_a_transformers_output():
    model, inputs = build("bert")
    out = model(**inputs)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (4, 2) and out.loss.ndim == 0
    assert model(input_ids=inputs["input_ids"]).loss is None
    _loss, logits = model(**inputs, return_dict=False)
    assert logits.shape == (4, 2)


def test_cached_states_give_the_same_logits():
    model, inputs = build("bert")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    cache = BackboneCache(model, [inputs])
    assert len(cache) == 4 and cache.nbytes() > 0
    states, mask = cache.batch([0, 1, 2, 3])
    assert torch.equal(mask, inputs["attention_mask"])
    with torch.no_grad():
        got = model(attention_mask=mask, backbone_states=states).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    half = BackboneCache(model, [inputs], dtype=torch.float16)
    assert half.nbytes() * 2 == cache.nbytes()
    # a different batch composition: example 2 alone, without the others' padding
    states, mask = cache.batch([2])
    with torch.no_grad():
        alone = model(attention_mask=mask, backbone_states=states).logits
    torch.testing.assert_close(alone[0], expected[2], rtol=1e-4, atol=1e-5)


def test_layer_dropping_and_merge_variant():
    config = LSTConfig(reduction_factor=4, init="magnitude", side_layers=[0, 2])
    model = get_lst_model(tiny_bert(), config)
    assert len(model.side.encoder.blocks) == 2 and model.side_layers_ == [0, 2]
    assert model(**batch()).logits.shape == (4, 2)
    merged = get_lst_model(
        tiny_bert(), LSTConfig(reduction_factor=4, init="random", merge_backbone_output=True)
    )
    inputs = batch()
    states = merged.backbone_states(inputs["input_ids"], inputs["attention_mask"])
    assert states.encoder_last is not None
    merged.eval()
    base = merged(**inputs).logits
    states.encoder_last = states.encoder_last + 1.0
    moved = merged(attention_mask=inputs["attention_mask"], backbone_states=states).logits
    assert not torch.allclose(base, moved)


def test_token_classification_and_regression():
    inputs = batch()
    tokens = torch.randint(0, 3, inputs["input_ids"].shape)
    tokens[inputs["attention_mask"] == 0] = -100
    model = get_lst_model(
        tiny_bert(),
        LSTConfig(reduction_factor=4, init="fisher", task="token-classification", num_labels=3),
        init_data=[{**inputs, "labels": tokens}],
    )
    out = model(**{**inputs, "labels": tokens})
    assert out.logits.shape == (*inputs["input_ids"].shape, 3) and torch.isfinite(out.loss)
    reg = get_lst_model(
        tiny_bert(),
        LSTConfig(reduction_factor=4, init="fisher", num_labels=1),
        init_data=[{**inputs, "labels": torch.randn(4)}],
    )
    out = reg(**{**inputs, "labels": torch.randn(4)})
    assert out.logits.shape == (4, 1) and torch.isfinite(out.loss)


def test_side_decoder_cross_attends_to_the_side_encoder():
    """Only the encoder-side states change: the seq2seq logits must move (through the side
    decoder's cross-attention), the decoder states being identical."""
    model, inputs = build("t5-seq2seq")
    model.eval()
    states = model.backbone_states(
        inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"]
    )
    assert states.decoder is not None
    with torch.no_grad():
        base = model(attention_mask=inputs["attention_mask"], backbone_states=states).logits
        states.encoder = states.encoder + torch.randn_like(states.encoder)
        moved = model(attention_mask=inputs["attention_mask"], backbone_states=states).logits
    assert base.shape == (4, 5, tiny_t5().config.vocab_size)
    assert not torch.allclose(base, moved)


def test_train_mode_keeps_the_backbone_in_eval_mode():
    model, _ = build("bert")
    model.train()
    assert model.side.training and not model.backbone.training
