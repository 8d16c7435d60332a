"""Labelled text for the LST trainer: TSV files, tokenisation once, right-padded batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TEXT_COLUMNS = ("sentence", "text")


def read_tsv(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` from a tab-separated file of integer labels and texts.

    A header naming the columns ``label`` and ``sentence`` (or ``text``) in any order is used
    when present (GLUE's format); otherwise each line is ``label<TAB>text``. Labels must be
    integers >= 0. ``ValueError`` names the file and line of the first bad row.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path} is empty")
    header = [c.strip().lower() for c in lines[0].split("\t")]
    text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if "label" in header and text_col is not None:
        label_col, start = header.index("label"), 1
    else:
        label_col, text_col, start = 0, 1, 0
    texts, labels = [], []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) <= max(label_col, text_col):
            raise ValueError(f"{path}:{number}: expected label<TAB>text, got {line[:60]!r}")
        try:
            label = int(cells[label_col])
        except ValueError:
            raise ValueError(
                f"{path}:{number}: label {cells[label_col][:20]!r} is not an integer"
            ) from None
        if label < 0:
            raise ValueError(f"{path}:{number}: label {label} is negative")
        texts.append(cells[text_col])
        labels.append(label)
    if not texts:
        raise ValueError(f"{path} has no examples")
    return texts, labels


def right_pad(parts: Sequence[Tensor], *, value: float = 0, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Stack tensors that differ only in the length of axis ``dim``, padded on the right.

    The result has a new batch axis at ``dim`` (the length axis follows it), filled with
    ``value`` past each part's length, and the ``(batch, max length)`` mask (1 = a real
    position, ``torch.long``). E.g. token ids of shape ``(t_i,)`` give ``(n, T)``; cached
    states of shape ``(blocks, t_i, d)`` with ``dim=1`` give ``(blocks, n, T, d)``.
    """
    first = parts[0]
    length = max(p.shape[dim] for p in parts)
    out = first.new_full((*first.shape[:dim], len(parts), length, *first.shape[dim + 1 :]), value)
    mask = torch.zeros(len(parts), length, dtype=torch.long, device=first.device)
    for j, part in enumerate(parts):
        t = part.shape[dim]
        out.select(dim, j).narrow(dim, 0, t).copy_(part)
        mask[j, :t] = 1
    return out, mask


@dataclass
class Encoded:
    """Token ids of each text (no padding) and the integer labels."""

    ids: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> Encoded:
        return Encoded([self.ids[i] for i in indices], self.labels[list(indices)])

    def batch(self, indices: Sequence[int], pad_id: int = 0) -> dict[str, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` of ``indices``."""
        rows = [torch.tensor(self.ids[i], dtype=torch.long) for i in indices]
        ids, mask = right_pad(rows, value=pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[list(indices)]}

    def grouped_batches(
        self, batch_size: int, generator: torch.Generator, group: int = 50
    ) -> list[list[int]]:
        """Shuffled batches of similar lengths (less padding): shuffle, sort each run of
        ``group * batch_size`` examples by length, cut into batches, shuffle the batches."""
        order = torch.randperm(len(self), generator=generator).tolist()
        out = []
        chunk = group * batch_size
        for k in range(0, len(order), chunk):
            part = sorted(order[k : k + chunk], key=lambda i: len(self.ids[i]), reverse=True)
            out += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
        return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]

    def batches(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        pad_id: int = 0,
    ) -> Iterator[dict[str, Tensor]]:
        """Batches in order, or shuffled when a ``generator`` is given (drawn lazily, when
        the first batch is taken)."""
        order = (
            torch.randperm(len(self), generator=generator).tolist()
            if generator is not None
            else list(range(len(self)))
        )
        for k in range(0, len(order), batch_size):
            yield self.batch(order[k : k + batch_size], pad_id)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Encoded:
    """Tokenise once (with the tokenizer's special tokens, truncated to ``max_length``)."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, torch.tensor(list(labels), dtype=torch.long))
