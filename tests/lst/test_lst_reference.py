"""The side network's forward pass against the independent float64 reference of
``kexue.testing.lst`` (written from docs/guides/lst.md), with gates away from 0.5, and the
loss against a float64 cross-entropy."""

from __future__ import annotations

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from kexue.lst import LSTConfig, get_lst_model
from kexue.lst.side import relative_position_bucket
from kexue.testing.lst import (
    cross_entropy_ref,
    lst_sequence_logits_ref,
    relative_bucket_ref,
    seq2seq_batch,
    side_stack_ref,
    tiny_bert,
    tiny_t5,
    token_batch,
)

ALPHA = {2: [-0.15, 0.2], 3: [-0.15, 0.05, 0.2]}  # gates 0.18, 0.62, 0.88 at T = 0.1


@torch.no_grad()
def _perturbed(model, seed: int = 0):
    """The model with every side parameter moved off its initial value (biases non-zero,
    norms not 1) and gates away from 0.5, in float64 and eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model.side.double()
    for p in model.side.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for stack in model.side.stacks().values():
        stack.alpha.copy_(torch.tensor(ALPHA[len(stack.blocks)]))
    return model.eval()


@pytest.mark.parametrize(
    "pooling, merge", [("mean", False), ("first", False), ("mean", True)], ids=str
)
def test_sequence_logits_match_the_reference(pooling, merge):
    config = LSTConfig(
        reduction_factor=4, init="magnitude", pooling=pooling, merge_backbone_output=merge
    )
    model = _perturbed(get_lst_model(tiny_bert(), config))
    gates = model.gate_values()["encoder"]
    assert gates.min() < 0.2 and gates.max() > 0.85
    inputs = token_batch()
    states = model.backbone_states(inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        out = model(attention_mask=inputs["attention_mask"], backbone_states=states, **_labels())
    expected = lst_sequence_logits_ref(
        model.side.state_dict(),
        states.encoder,
        inputs["attention_mask"],
        temperature=0.1,
        heads=4,
        eps=model.backbone.config.layer_norm_eps,
        pooling=pooling,
        last=states.encoder_last,
    )
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, cross_entropy_ref(out.logits, _labels()["labels"]))


def _labels() -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([1, 0, 0, 1])}


def test_token_classification_loss_ignores_minus_100():
    model = _perturbed(
        get_lst_model(
            tiny_bert(),
            LSTConfig(reduction_factor=4, init="magnitude", task="token-classification"),
        )
    )
    inputs = token_batch()
    labels = torch.randint(0, 2, inputs["input_ids"].shape, generator=torch.Generator())
    labels[inputs["attention_mask"] == 0] = -100
    with torch.no_grad():
        out = model(**{**inputs, "labels": labels})
    torch.testing.assert_close(out.loss, cross_entropy_ref(out.logits, labels))


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
def test_t5_side_stacks_match_the_reference(gated):
    """Encoder (bidirectional position buckets) and decoder (causal, cross-attention to the
    side encoder) stacks of a T5 side network."""
    t5 = tiny_t5(gated=gated)
    config = LSTConfig(reduction_factor=4, init="magnitude", task="seq2seq-lm")
    model = _perturbed(get_lst_model(t5, config))
    inputs = seq2seq_batch()
    states = model.backbone_states(
        inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"]
    )
    mask = inputs["attention_mask"]
    dec_mask = torch.ones(states.decoder.shape[1:3], dtype=torch.long)
    dec_mask[0, 4:] = 0
    common = {
        "temperature": 0.1,
        "heads": 4,
        "eps": t5.config.layer_norm_epsilon,
        "style": "t5",
        "activation": t5.config.dense_act_fn,
        "max_distance": t5.config.relative_attention_max_distance,
    }
    with torch.no_grad():
        enc = model.side.encoder(states.encoder, mask)
        dec = model.side.decoder(states.decoder, dec_mask, enc, mask)
    enc_ref = side_stack_ref(model.side.encoder.state_dict(), states.encoder, mask, **common)
    torch.testing.assert_close(enc, enc_ref, rtol=1e-10, atol=1e-12)
    dec_ref = side_stack_ref(
        model.side.decoder.state_dict(),
        states.decoder,
        dec_mask,
        causal=True,
        memory=enc,
        memory_mask=mask,
        **common,
    )
    torch.testing.assert_close(dec, dec_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_t5_and_the_reference(bidirectional):
    """Against transformers' own T5 bucketing (a peer implementation) and the plain-math
    reference, over offsets up to beyond max_distance."""
    offsets = torch.arange(-300, 301)
    kwargs = {"bidirectional": bidirectional, "buckets": 32, "max_distance": 128}
    ours = relative_position_bucket(offsets, **kwargs)
    theirs = T5Attention._relative_position_bucket(
        offsets, bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    assert torch.equal(ours, theirs)
    small = [relative_bucket_ref(o, **kwargs) for o in range(-15, 16)]
    assert ours[285:316].tolist() == small
