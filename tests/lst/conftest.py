"""Fixtures shared by the kexue.lst tests (tiny models and batches: ``kexue.testing.lst``)."""

from __future__ import annotations

import random

import pytest
import torch

from kexue.testing.lst import tiny_model_folder


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP
    spins on every small op while another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_task(tmp_path_factory):
    """``(folder, model folder)``: a tiny saved BERT with a word tokenizer, ``train.tsv`` (40
    rows, GLUE header) and ``dev.tsv`` (8 rows, no header) of a two-class polarity task."""
    root = tmp_path_factory.mktemp("lst-task")
    model = tiny_model_folder(root / "model")
    rng = random.Random(0)
    pos, neg = "good great fine nice".split(), "bad awful poor sad".split()
    rows = []
    for _ in range(48):
        label = rng.randint(0, 1)
        word = rng.choice(pos if label else neg)
        rows.append(f"{label}\tthe movie was very {word}")
    (root / "train.tsv").write_text("label\tsentence\n" + "\n".join(rows[:40]) + "\n")
    (root / "dev.tsv").write_text("\n".join(rows[40:]) + "\n")  # headerless form
    return root, model
