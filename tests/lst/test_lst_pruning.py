"""Pruning initialisation: the side blocks are exactly the selected rows/columns of the
backbone blocks, chosen by importance (|w| or the diagonal Fisher information)."""

from __future__ import annotations

import pytest
import torch

from kexue.lst import LSTConfig, get_lst_model
from kexue.lst.backbones import backbone_adapter
from kexue.lst.pruning import fisher_importance, magnitude_importance
from kexue.testing.lst import seq2seq_batch, tiny_bert, tiny_t5
from kexue.testing.lst import token_batch as batch


def _top_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.topk(k).indices.sort().values


def _check_copied(model, stack_name: str) -> int:
    """Every side weight equals backbone_weight[rows][:, cols] of the plan; returns count."""
    plan = model.pruning_plan_
    r = plan.residual
    adapter = model.backbone_adapter
    side = model.side.stacks()[stack_name]
    checked = 0
    for block, layer, rows in zip(side.blocks, plan.layers, plan.blocks[stack_name], strict=True):
        src = adapter.block_modules(stack_name, layer)
        pairs = [
            (block.attn.q, src["q"], rows["qk"], r),
            (block.attn.k, src["k"], rows["qk"], r),
            (block.attn.v, src["v"], rows["v"], r),
            (block.attn.o, src["o"], r, rows["v"]),
            (block.ffn.wi, src["wi"], rows["ffn"], r),
            (block.ffn.wo, src["wo"], r, rows["ffn"]),
        ]
        if block.ffn.wi_lin is not None:
            pairs.append((block.ffn.wi_lin, src["wi_lin"], rows["ffn"], r))
        if block.cross is not None:
            pairs += [
                (block.cross.q, src["xq"], rows["xqk"], r),
                (block.cross.k, src["xk"], rows["xqk"], r),
                (block.cross.v, src["xv"], rows["xv"], r),
                (block.cross.o, src["xo"], r, rows["xv"]),
            ]
        for dst, ref, keep_rows, keep_cols in pairs:
            assert torch.equal(dst.weight, ref.weight[keep_rows][:, keep_cols])
            if ref.bias is not None:
                assert torch.equal(dst.bias, ref.bias[keep_rows])
            checked += 1
        for dst, ref in ((block.norm1, src["norm1"]), (block.norm2, src["norm2"])):
            assert torch.equal(dst.weight, ref.weight[r])
            checked += 1
    x = torch.randn(3, adapter.width)
    for proj in [side.embed_down, *side.ladders]:  # coordinate selections x -> x[R]
        assert torch.equal(proj(x), x[:, r])
    return checked


@pytest.mark.parametrize("init", ["magnitude", "fisher"])
def test_bert_side_blocks_are_the_selected_rows_of_the_backbone(init):
    bert = tiny_bert()
    model = get_lst_model(
        bert, LSTConfig(reduction_factor=4, init=init, fisher_samples=8), init_data=[batch()]
    )
    assert _check_copied(model, "encoder") == 3 * 8
    plan = model.pruning_plan_
    assert plan.residual.shape == (8,) and len(plan.blocks["encoder"]) == 3
    for rows in plan.blocks["encoder"]:
        assert rows["qk"].shape == (8,) and rows["v"].shape == (8,) and rows["ffn"].shape == (16,)
        # kept rows stay inside their head: 4 heads x 8 rows -> 2 kept per head
        assert torch.equal(rows["qk"] // 8, torch.arange(4).repeat_interleave(2))
    h = torch.randn(2, 32)
    assert torch.equal(
        model.side.up(h[:, plan.residual]),
        torch.zeros(2, 32).index_copy(1, plan.residual, h[:, plan.residual]),
    )


def test_t5_side_blocks_are_the_selected_rows_of_the_backbone():
    t5 = tiny_t5(gated=True)
    model = get_lst_model(
        t5,
        LSTConfig(reduction_factor=4, init="fisher", task="seq2seq-lm", fisher_samples=4),
        init_data=[seq2seq_batch()],
    )
    assert _check_copied(model, "encoder") == 2 * (7 + 2)
    assert _check_copied(model, "decoder") == 2 * (7 + 4 + 2)
    r = model.pruning_plan_.residual
    for name in ("encoder", "decoder"):
        stack, ref = model.side.stacks()[name], getattr(t5, name)
        assert torch.equal(stack.final_norm.weight, ref.final_layer_norm.weight[r])
        bias = ref.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(stack.position_bias.weight, bias)
        for block in stack.blocks[:1]:
            if block.cross is not None:
                src = ref.block[0].layer[1]
                assert torch.equal(block.norm_cross.weight, src.layer_norm.weight[r])


def test_magnitude_selection_keeps_the_largest_rows():
    """Recompute the choice independently from |w| and compare."""
    _check_magnitude_selection(tiny_bert())


def test_magnitude_selection_counts_biases_and_norms():
    """A fresh BERT has zero biases and unit norms, so the test above cannot see whether they
    are counted; here they are random."""
    bert = tiny_bert()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bert.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen))
    _check_magnitude_selection(bert)


def _check_magnitude_selection(bert):
    model = get_lst_model(bert, LSTConfig(reduction_factor=4, init="magnitude"))
    plan = model.pruning_plan_
    score = torch.zeros(32)
    for layer in bert.encoder.layer:
        a = layer.attention
        for lin in (a.self.query, a.self.key, a.self.value, layer.intermediate.dense):
            score += lin.weight.abs().sum(0)
        for lin in (a.output.dense, layer.output.dense):
            score += lin.weight.abs().sum(1) + lin.bias.abs()
        for norm in (a.output.LayerNorm, layer.output.LayerNorm):
            score += norm.weight.abs() + norm.bias.abs()
    r = _top_sorted(score, 8)
    assert torch.equal(plan.residual, r)
    for layer, rows in zip(bert.encoder.layer, plan.blocks["encoder"], strict=True):
        s = layer.attention.self

        def row_score(lin):
            return lin.weight.abs()[:, r].sum(1) + lin.bias.abs()

        qk = (row_score(s.query) + row_score(s.key)).view(4, 8)
        expected = torch.cat([_top_sorted(qk[h], 2) + 8 * h for h in range(4)])
        assert torch.equal(rows["qk"], expected)
        assert torch.equal(rows["ffn"], _top_sorted(row_score(layer.intermediate.dense), 16))


def test_fisher_is_the_sum_of_squared_per_example_gradients():
    """seq2seq-lm uses the backbone's own LM loss: compare with a direct computation."""
    t5 = tiny_t5().requires_grad_(False)  # frozen, as get_lst_model leaves it
    data = seq2seq_batch(n=3)
    adapter = backbone_adapter(t5)
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    fisher = fisher_importance(adapter, [0, 1], [data], samples=3, task="seq2seq-lm", num_labels=1)
    weight = t5.encoder.block[1].layer[1].DenseReluDense.wi.weight
    expected = torch.zeros_like(weight)
    weight.requires_grad_(True)
    for i in range(3):
        t = int(data["attention_mask"][i].sum())
        loss = t5(
            input_ids=data["input_ids"][i : i + 1, :t],
            attention_mask=data["attention_mask"][i : i + 1, :t],
            labels=data["labels"][i : i + 1],
        ).loss
        (g,) = torch.autograd.grad(loss, [weight])
        expected += g.square()
    weight.requires_grad_(False)
    torch.testing.assert_close(fisher["encoder.1.wi.weight"], expected, rtol=1e-5, atol=1e-12)
    # the backbone is left exactly as it was
    assert all(torch.equal(v, before[k]) for k, v in t5.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in t5.parameters())


def test_fisher_and_magnitude_differ_and_classification_uses_a_probe():
    bert = tiny_bert()
    adapter = backbone_adapter(bert)
    data = [batch(seed=s, n=8) for s in range(2)]
    fisher = fisher_importance(
        adapter, [0, 1, 2], data, samples=16, task="sequence-classification", num_labels=2
    )
    magnitude = magnitude_importance(adapter, [0, 1, 2])
    assert set(fisher) == set(magnitude)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())
    assert any(v.sum() > 0 for v in fisher.values())
    assert not all(
        torch.equal(fisher[k].argsort(), magnitude[k].argsort()) for k in fisher if "weight" in k
    )


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_batched_per_example_gradients_equal_one_example_per_pass(task):
    """The Fisher pass takes per-example gradients out of one backward pass per batch; with
    batch_size=1 every pass holds one example: both must agree."""
    bert = tiny_bert().requires_grad_(False)
    adapter = backbone_adapter(bert)
    data = batch(seed=3, n=6)
    if task == "token-classification":
        tokens = torch.randint(0, 3, data["input_ids"].shape)
        tokens[data["attention_mask"] == 0] = -100
        data = {**data, "labels": tokens}
    kwargs = {"samples": 6, "task": task, "num_labels": 3 if "token" in task else 2}
    one = fisher_importance(adapter, [0, 1, 2], [data], batch_size=1, **kwargs)
    many = fisher_importance(adapter, [0, 1, 2], [data], batch_size=4, **kwargs)
    for key in one:
        torch.testing.assert_close(many[key], one[key], rtol=1e-4, atol=1e-10)
