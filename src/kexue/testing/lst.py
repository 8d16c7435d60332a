"""Independent float64 reference of the LST side network, written from ``docs/guides/lst.md``,
and the tiny random backbones the LST tests, examples and smoke runs use.

The reference reads the side network's parameters by name (a ``state_dict``) and recomputes
its forward pass from the formulas of the guide, one head at a time, with its own layer norm,
RMS norm, GELU, softmax attention and T5 position buckets (plain ``math`` for the buckets):

    h = E e + c                                   (down-projection of the embeddings)
    for side block j:
        mu_j = 1 / (1 + exp(-alpha_j / T))
        h = mu_j h + (1 - mu_j) (D_j b_j + c_j)    (ladder from backbone layer l_j)
        h = block_j(h)
    logits = W pool(U h + u) + w0                 (sequence classification)

Nothing here imports ``kexue.lst``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

__all__ = [
    "VOCAB",
    "cross_entropy_ref",
    "gelu_ref",
    "layer_norm_ref",
    "lst_sequence_logits_ref",
    "relative_bucket_ref",
    "rms_norm_ref",
    "seq2seq_batch",
    "side_stack_ref",
    "tiny_bert",
    "tiny_model_folder",
    "tiny_t5",
    "token_batch",
]

VOCAB = 60


# -- references ------------------------------------------------------------------------------


def gelu_ref(x: Tensor, approximate: bool = False) -> Tensor:
    """``x Phi(x)`` (exact, BERT's ``"gelu"``) or the tanh form (T5's ``"gelu_new"``)."""
    if approximate:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (biased var)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` (T5's norm: no centring, no bias)."""
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def relative_bucket_ref(
    offset: int, *, bidirectional: bool, buckets: int, max_distance: int
) -> int:
    """T5's bucket of a ``key - query`` offset: exact below half the (per-direction) buckets,
    then logarithmic up to ``max_distance``."""
    bucket = 0
    if bidirectional:
        buckets //= 2
        if offset > 0:
            bucket = buckets
        n = abs(offset)
    else:
        n = max(-offset, 0)
    exact = buckets // 2
    if n < exact:
        return bucket + n
    far = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact))
    return bucket + min(far, buckets - 1)


def _linear(p: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    out = x @ p[f"{name}.weight"].T
    bias = p.get(f"{name}.bias")
    return out if bias is None else out + bias


def _attention(
    p: dict[str, Tensor],
    name: str,
    x: Tensor,
    source: Tensor,
    keep: Tensor,
    heads: int,
    scale: float,
    position: Tensor | None,
) -> Tensor:
    """Multi-head attention, head by head. ``keep``: (batch, queries, keys) booleans;
    ``position``: (heads, queries, keys) additive bias or None."""
    q, k, v = (_linear(p, f"{name}.{r}", s) for r, s in (("q", x), ("k", source), ("v", source)))
    size = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        cols = slice(h * size, (h + 1) * size)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) * scale
        if position is not None:
            scores = scores + position[h]
        scores = scores.masked_fill(~keep, -math.inf)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(weights @ v[..., cols])
    return _linear(p, f"{name}.o", torch.cat(outs, -1))


def side_stack_ref(
    params: dict[str, Tensor],
    states: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    heads: int,
    eps: float,
    style: str = "bert",
    activation: str = "gelu",
    causal: bool = False,
    memory: Tensor | None = None,
    memory_mask: Tensor | None = None,
    max_distance: int = 128,
) -> Tensor:
    """The side stack's output (batch, seq, w) in float64.

    ``params``: the stack's ``state_dict`` (``embed_down``, ``ladders.j``, ``alpha``,
    ``blocks.j.*``, and for T5 ``final_norm``, ``position_bias``); ``states``: (1 + blocks,
    batch, seq, d) = embeddings then the backbone outputs of the side layers; ``mask``:
    (batch, seq), 1 = token. ``style="bert"``: post-LayerNorm blocks, attention scaled by
    ``1/sqrt(head size)``; ``"t5"``: pre-RMSNorm blocks, unscaled attention plus relative
    position biases, optional causal self-attention and cross-attention to ``memory``, a
    final RMS norm. ``activation``: ``"gelu"``, ``"gelu_new"`` or ``"relu"``.
    """
    p = {k: v.detach().double() for k, v in params.items()}
    x = states.detach().double()
    t = mask.shape[1]
    keep = mask.bool()[:, None, :].expand(-1, t, -1)
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool).tril()
    t5 = style == "t5"
    position = None
    if t5 and "position_bias.weight" in p:
        table = p["position_bias.weight"]
        index = [
            [
                relative_bucket_ref(
                    key - query,
                    bidirectional=not causal,
                    buckets=table.shape[0],
                    max_distance=max_distance,
                )
                for key in range(t)
            ]
            for query in range(t)
        ]
        position = table[torch.tensor(index)].permute(2, 0, 1)  # (heads, queries, keys)
    memory_keep = None
    if memory is not None:
        memory = memory.detach().double()
        memory_keep = cast(Tensor, memory_mask).bool()[:, None, :].expand(-1, t, -1)  # with memory

    def act(z: Tensor) -> Tensor:
        if activation == "relu":
            return z.clamp_min(0)
        return gelu_ref(z, approximate=activation == "gelu_new")

    def norm(name: str, z: Tensor) -> Tensor:
        if t5:
            return rms_norm_ref(z, p[f"{name}.weight"], eps)
        return layer_norm_ref(z, p[f"{name}.weight"], p[f"{name}.bias"], eps)

    h = _linear(p, "embed_down", x[0])
    gates = 1 / (1 + torch.exp(-p["alpha"] / temperature))
    blocks = p["alpha"].shape[0]
    scale = 1.0 if t5 else 1 / math.sqrt(p["blocks.0.attn.q.weight"].shape[0] / heads)
    for j in range(blocks):
        b = f"blocks.{j}"
        h = gates[j] * h + (1 - gates[j]) * _linear(p, f"ladders.{j}", x[j + 1])
        if not t5:
            h = norm(f"{b}.norm1", h + _attention(p, f"{b}.attn", h, h, keep, heads, scale, None))
            inner = act(_linear(p, f"{b}.ffn.wi", h))
            h = norm(f"{b}.norm2", h + _linear(p, f"{b}.ffn.wo", inner))
            continue
        z = norm(f"{b}.norm1", h)
        h = h + _attention(p, f"{b}.attn", z, z, keep, heads, scale, position)
        if memory is not None:
            z = norm(f"{b}.norm_cross", h)
            keep_memory = cast(Tensor, memory_keep)  # set with memory
            h = h + _attention(p, f"{b}.cross", z, memory, keep_memory, heads, scale, None)
        z = norm(f"{b}.norm2", h)
        inner = act(_linear(p, f"{b}.ffn.wi", z))
        if f"{b}.ffn.wi_lin.weight" in p:
            inner = inner * _linear(p, f"{b}.ffn.wi_lin", z)
        h = h + _linear(p, f"{b}.ffn.wo", inner)
    return rms_norm_ref(h, p["final_norm.weight"], eps) if t5 else h


def lst_sequence_logits_ref(
    side_params: dict[str, Tensor],
    states: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    heads: int,
    eps: float,
    pooling: str = "mean",
    last: Tensor | None = None,
) -> Tensor:
    """Sequence-classification logits of a BERT-style side network: the encoder stack, the
    up-projection (plus the backbone's last state ``last`` when given), pooling over the
    tokens with ``mask == 1`` (``"mean"``) or the first token, the linear head.

    ``side_params``: the ``state_dict`` of the whole side network (``encoder.*``, ``up``,
    ``head``)."""
    stack = {k[len("encoder.") :]: v for k, v in side_params.items() if k.startswith("encoder.")}
    h = side_stack_ref(stack, states, mask, temperature=temperature, heads=heads, eps=eps)
    p = {k: v.detach().double() for k, v in side_params.items()}
    h = _linear(p, "up", h)
    if last is not None:
        h = h + last.detach().double()
    if pooling == "first":
        pooled = h[:, 0]
    else:
        m = mask.double()
        pooled = torch.stack(
            [(h[i] * m[i, :, None]).sum(0) / m[i].sum() for i in range(h.shape[0])]
        )
    return _linear(p, "head", pooled)


def cross_entropy_ref(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean over the kept rows of ``logsumexp(z) - z_y`` (float64, one row at a time)."""
    z = logits.detach().double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1).tolist()
    terms = []
    for row, label in zip(z, y, strict=True):
        if label == ignore_index:
            continue
        top = row.max()
        terms.append(top + torch.log(torch.exp(row - top).sum()) - row[label])
    return torch.stack(terms).mean()


# -- tiny random backbones and batches ---------------------------------------------------------


def tiny_bert(seed: int = 0, layers: int = 3):
    """A random BERT (width 32, 4 heads, FFN 64, vocabulary :data:`VOCAB`) in eval mode."""
    from transformers import BertConfig, BertModel

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


def tiny_t5(seed: int = 0, gated: bool = False):
    """A random T5 encoder-decoder with an LM head (width 32, 2 + 2 layers) in eval mode."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    # transformers' typed T5Config.__init__ omits the PreTrainedConfig keywords it accepts
    config = T5Config(  # type: ignore[call-arg]
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


def token_batch(seed: int = 0, n: int = 4, t: int = 7, num_labels: int = 2) -> dict[str, Tensor]:
    """Right-padded random token ids (example ``i`` has ``t - i % 3`` tokens), class labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(n):
        length = t - (i % 3)
        mask[i, length:] = 0
        ids[i, length:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_batch(seed: int = 0, n: int = 4, t: int = 7, t_out: int = 5) -> dict[str, Tensor]:
    """:func:`token_batch` with target token ids as labels (-100 after position 3 of row 0)."""
    out = token_batch(seed, n, t)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(1, VOCAB, (n, t_out), generator=gen)
    labels[0, 3:] = -100
    out["labels"] = labels
    return out


POLARITY_WORDS = "good great fine nice bad awful poor sad movie film plot the a is was very not"


def tiny_model_folder(folder: str | Path, seed: int = 0) -> Path:
    """A tiny BERT with a word-level tokenizer saved as a Hugging Face model folder
    (safetensors), for the CLI, the run pipeline and the benchmark's smoke plan."""
    from transformers import BertTokenizer

    folder = Path(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POLARITY_WORDS.split()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_bert(seed).save_pretrained(folder, safe_serialization=True)
    return folder
