"""Tiny random backbones and batches shared by the kexue.lst tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

VOCAB = 60


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP
    spins on every small op while another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(seed: int = 0, layers: int = 3) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_t5(seed: int = 0, gated: bool = False) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5ForConditionalGeneration(config).eval()


def batch(seed: int = 0, n: int = 4, t: int = 7, num_labels: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded random token ids with class labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(n):
        length = t - (i % 3)
        mask[i, length:] = 0
        ids[i, length:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_batch(seed: int = 0, n: int = 4, t: int = 7, t_out: int = 5) -> dict:
    out = batch(seed, n, t)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(1, VOCAB, (n, t_out), generator=gen)
    labels[0, 3:] = -100
    out["labels"] = labels
    return out


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT with a word-level tokenizer saved like a Hugging Face model folder."""
    from transformers import BertTokenizer

    words = "good great fine nice bad awful poor sad movie film plot the a is was very not".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_bert(seed).save_pretrained(folder, safe_serialization=True)
    return folder
