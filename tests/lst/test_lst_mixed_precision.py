"""Mixed precision: the frozen backbone's forward under autocast, the side network in float32.

Reference: the same model with the backbone in float32; bfloat16 keeps 8 bits of mantissa
(relative error up to 2^-8 per rounding), so on a tiny random BERT the logits agree to a few
1e-2 and the losses of a short run to 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from kexue.lst import LSTConfig, RunSpec, get_lst_model, run
from kexue.lst.parallel import autocast_dtype
from kexue.testing.lst import tiny_bert, token_batch


def test_bf16_backbone_float32_side_network():
    batch = token_batch(seed=1, n=6, t=9)
    model = get_lst_model(tiny_bert(), LSTConfig(reduction_factor=4, init="magnitude"))
    model.eval()
    seen = []  # dtypes of a backbone matmul's output, of the side network's first projection
    query = model.backbone.encoder.layer[0].attention.self.query
    query.register_forward_hook(lambda m, i, out: seen.append(("backbone", out.dtype)))
    model.side.encoder.embed_down.register_forward_hook(
        lambda m, i, out: seen.append(("side", out.dtype))
    )
    with torch.no_grad():
        reference = model(**batch)
        states32 = model.backbone_states(batch["input_ids"], batch["attention_mask"])
        model.backbone_autocast = torch.bfloat16
        seen.clear()
        states16 = model.backbone_states(batch["input_ids"], batch["attention_mask"])
        mixed = model(**batch)
    assert seen == [("backbone", torch.bfloat16)] * 2 + [("side", torch.float32)]
    assert all(p.dtype == torch.float32 for p in model.side.parameters())
    assert mixed.logits.dtype == torch.float32 and mixed.loss.dtype == torch.float32
    torch.testing.assert_close(states16.encoder.float(), states32.encoder, rtol=0.02, atol=0.05)
    torch.testing.assert_close(mixed.logits, reference.logits, rtol=0.02, atol=0.02)
    assert not torch.equal(states16.encoder, states32.encoder)


def test_run_with_bf16_on_cpu(text_task):
    root, model = text_task
    base = {"backbone": str(model), "train": str(root / "train.tsv"),
            "eval": str(root / "dev.tsv"), "epochs": 1, "batch_size": 8, "init": "magnitude",
            "reduction_factor": 4, "dropout": 0.0, "device": "cpu"}  # fmt: skip
    full = run(RunSpec(**base), progress=False)
    mixed = run(RunSpec(**base, mixed_precision="bf16"), progress=False)
    assert mixed.model.backbone_autocast is torch.bfloat16
    assert mixed.to_dict()["spec"]["mixed_precision"] == "bf16"
    torch.testing.assert_close(
        torch.tensor(mixed.stats.losses), torch.tensor(full.stats.losses), rtol=0, atol=1e-2
    )


def test_mixed_precision_choices_name_the_argument():
    cpu = torch.device("cpu")
    assert autocast_dtype("no", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="mixed_precision"):
        autocast_dtype("fp8", cpu)
    base = {"backbone": "m", "train": "t.tsv", "eval": "e.tsv"}
    with pytest.raises(ValueError, match="mixed_precision"):
        RunSpec(**base, mixed_precision="half")
    with pytest.raises(ValueError, match="method='lst'"):
        RunSpec(**base, method="full", mixed_precision="bf16")
    with pytest.raises(ValueError, match="device"):
        RunSpec(**base, device="tpu")
    with pytest.raises(TypeError, match="device"):
        RunSpec(**base, device=0)
