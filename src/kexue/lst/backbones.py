"""Adapters that read per-layer hidden states out of frozen Hugging Face backbones.

Two families are supported:

- BERT-family encoders (BERT, RoBERTa, ELECTRA, MiniLM, ...): any bidirectional encoder whose
  forward returns ``hidden_states`` (embeddings + one per layer) with ``hidden_size``,
  ``num_hidden_layers``, ``num_attention_heads`` and ``intermediate_size`` in its config.
  Pruning initialisation also needs BERT's module names (``encoder.layer[i].attention.self
  .query`` ...); ``init="random"`` does not.
- T5 encoder-decoders (``T5Model``, ``T5ForConditionalGeneration``, mT5, ...).

Anything else raises ``ValueError`` naming what is missing. See ``docs/guides/lst.md``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from kexue.lst.side import SideDims

_ENCODER_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads")
_T5_CONFIG = ("d_model", "d_kv", "num_heads", "d_ff", "num_layers", "num_decoder_layers")


@dataclass
class BackboneStates:
    """What the side network reads from the backbone (no autograd history).

    ``encoder``: (1 + side blocks, batch, seq, d): token embeddings, then the outputs of the
    side layers. ``encoder_last``: (batch, seq, d) last hidden state (only with
    ``merge_backbone_output``). ``decoder``: the same for a T5 decoder, or ``None``.
    """

    encoder: Tensor
    encoder_last: Tensor | None = None
    decoder: Tensor | None = None
    decoder_last: Tensor | None = None

    def to(self, *args, **kwargs) -> BackboneStates:
        # the first field (encoder) is never None, so the result has one too
        return BackboneStates(
            *cast(
                "Iterator[Any]",
                (t.to(*args, **kwargs) if t is not None else None for t in self._fields()),
            )
        )

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.encoder, self.encoder_last, self.decoder, self.decoder_last)


def _missing(config: object, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if getattr(config, n, None) is None]


def _divide(total: int, r: int, what: str) -> int:
    if total % r:
        raise ValueError(
            f"reduction_factor={r} must divide the backbone's {what} ({total}); the side "
            "network keeps the number of heads and shrinks every width by r"
        )
    return total // r


class EncoderBackbone:
    """A frozen BERT-family encoder: hidden states of every layer in one no-grad pass."""

    family: Literal["encoder"] = "encoder"

    def __init__(self, model: nn.Module) -> None:
        config: Any = model.config  # a transformers PretrainedConfig (dynamic attributes)
        missing = _missing(config, _ENCODER_CONFIG)
        if missing:
            raise ValueError(
                f"{type(model).__name__} is not supported by kexue.lst: its config lacks "
                f"{missing} (needed for BERT-family encoders; T5 encoder-decoders are also "
                "supported)"
            )
        self.model = model
        self.base = getattr(model, "base_model", model)
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.width = config.hidden_size

    def dims(self, r: int) -> SideDims:
        c = self.config
        head = c.hidden_size // c.num_attention_heads
        ffn = getattr(c, "intermediate_size", None) or getattr(c, "hidden_dim", None)
        if ffn is None:
            raise ValueError(
                f"{type(self.model).__name__}'s config has no intermediate_size (the FFN width "
                "the side blocks shrink by r)"
            )
        return SideDims(
            style="bert",
            backbone_width=c.hidden_size,
            width=_divide(c.hidden_size, r, "hidden_size"),
            heads=c.num_attention_heads,
            head_dim=_divide(head, r, "attention head size"),
            ffn=_divide(ffn, r, "intermediate_size"),
            eps=getattr(c, "layer_norm_eps", 1e-12),
            activation=getattr(c, "hidden_act", "gelu"),
        )

    def check_forward(self) -> None:
        """One tiny pass: ``hidden_states`` must come back, one per layer, and bidirectional
        (token 0 must see later tokens, else the model is a causal decoder)."""
        vocab = getattr(self.config, "vocab_size", 6) or 6
        ids = torch.tensor([[1, 2, 3]]) % vocab
        states = self._hidden(ids, torch.ones_like(ids), None)
        if states is None or len(states) != self.num_layers + 1:
            got = "none" if states is None else len(states)
            raise ValueError(
                f"{type(self.model).__name__} is not supported by kexue.lst: with "
                f"output_hidden_states=True it must return {self.num_layers + 1} hidden states "
                f"(embeddings + one per layer), got {got}"
            )
        # the same model returned hidden states just above
        other = cast(
            "tuple[Tensor, ...]",
            self._hidden(torch.tensor([[1, 4, 5]]) % vocab, torch.ones_like(ids), None),
        )
        if torch.equal(states[-1][0, 0], other[-1][0, 0]):
            raise ValueError(
                f"{type(self.model).__name__} looks like a causal (decoder-only) model: token 0's "
                "states ignore later tokens. kexue.lst supports bidirectional BERT-family "
                "encoders and T5 encoder-decoders"
            )

    @torch.no_grad()
    def _hidden(self, input_ids, attention_mask, token_type_ids) -> tuple[Tensor, ...] | None:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.base(**kwargs, output_hidden_states=True, return_dict=True)
        return getattr(out, "hidden_states", None)

    def states(
        self,
        layers: list[int],
        want_last: bool,
        *,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        **_: object,
    ) -> BackboneStates:
        # check_forward (run by backbone_adapter) proved that hidden states come back
        hidden = cast("tuple[Tensor, ...]", self._hidden(input_ids, attention_mask, token_type_ids))
        picked = torch.stack([hidden[0]] + [hidden[i + 1] for i in layers])
        return BackboneStates(picked, hidden[-1] if want_last else None)

    def layer_modules(self, i: int) -> dict[str, nn.Module]:
        """BERT's modules of layer ``i`` by role; ``ValueError`` naming what is missing."""
        roles = {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "norm1": "attention.output.LayerNorm",
            "wi": "intermediate.dense",
            "wo": "output.dense",
            "norm2": "output.LayerNorm",
        }
        layer_list = getattr(getattr(self.base, "encoder", None), "layer", None)
        if layer_list is None:
            raise ValueError(
                f"pruning init (init='fisher' or 'magnitude') needs BERT-style layers at "
                f"encoder.layer; {type(self.base).__name__} has none. Use init='random'"
            )
        layer = layer_list[i]
        out = {}
        for role, path in roles.items():
            try:
                out[role] = layer.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"pruning init needs BERT-style module {path!r} in encoder.layer[{i}] "
                    f"({type(layer).__name__}); use init='random'"
                ) from None
        return out

    def stacks(self) -> dict[str, int]:
        return {"encoder": self.num_layers}

    def block_modules(self, stack: str, i: int) -> dict[str, nn.Module]:
        return self.layer_modules(i)

    def stack_extras(self, stack: str) -> dict[str, nn.Module]:
        return {}

    def lm_head(self) -> nn.Module | None:
        return None


class T5Backbone:
    """A frozen T5 encoder-decoder: hidden states of both stacks in no-grad passes."""

    family: Literal["t5"] = "t5"

    def __init__(self, model: nn.Module) -> None:
        config: Any = model.config  # a transformers PretrainedConfig (dynamic attributes)
        missing = _missing(config, _T5_CONFIG)
        for attr in ("encoder", "decoder"):
            if not isinstance(getattr(model, attr, None), nn.Module):
                missing.append(f"model.{attr}")
        if missing:
            raise ValueError(
                f"{type(model).__name__} is not supported by kexue.lst as a T5 encoder-decoder: "
                f"it lacks {missing}"
            )
        self.model, self.config = model, config
        self.num_layers = config.num_layers
        self.num_decoder_layers = config.num_decoder_layers
        self.width = config.d_model

    def dims(self, r: int) -> SideDims:
        c = self.config
        return SideDims(
            style="t5",
            backbone_width=c.d_model,
            width=_divide(c.d_model, r, "d_model"),
            heads=c.num_heads,
            head_dim=_divide(c.d_kv, r, "d_kv (head size)"),
            ffn=_divide(c.d_ff, r, "d_ff"),
            eps=c.layer_norm_epsilon,
            activation=c.dense_act_fn,
            gated=bool(c.is_gated_act),
            buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        )

    def check_forward(self) -> None:
        """Nothing to probe: the T5 classes are known to return per-layer hidden states."""

    @torch.no_grad()
    def states(
        self,
        layers: list[int],
        want_last: bool,
        *,
        input_ids: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        **_: object,
    ) -> BackboneStates:
        encoder = cast(nn.Module, self.model.encoder)  # checked in __init__
        enc = encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
        )
        h = enc.hidden_states
        out = BackboneStates(
            torch.stack([h[0]] + [h[i + 1] for i in layers]), h[-1] if want_last else None
        )
        if decoder_input_ids is not None:
            decoder = cast(nn.Module, self.model.decoder)  # checked in __init__
            dec = decoder(
                input_ids=decoder_input_ids,
                attention_mask=decoder_attention_mask,
                encoder_hidden_states=enc.last_hidden_state,
                encoder_attention_mask=attention_mask,
                output_hidden_states=True,
                use_cache=False,
                return_dict=True,
            )
            g = dec.hidden_states
            out.decoder = torch.stack([g[0]] + [g[i + 1] for i in layers])
            out.decoder_last = g[-1] if want_last else None
        return out

    def stacks(self) -> dict[str, int]:
        return {"encoder": self.num_layers, "decoder": self.num_decoder_layers}

    def block_modules(self, stack: str, i: int) -> dict[str, nn.Module]:
        block = getattr(self.model, stack).block[i]
        attn = block.layer[0]
        ff = block.layer[-1]
        out = {
            "q": attn.SelfAttention.q,
            "k": attn.SelfAttention.k,
            "v": attn.SelfAttention.v,
            "o": attn.SelfAttention.o,
            "norm1": attn.layer_norm,
            "norm2": ff.layer_norm,
        }
        dense = ff.DenseReluDense
        if hasattr(dense, "wi_0"):
            out.update(wi=dense.wi_0, wi_lin=dense.wi_1, wo=dense.wo)
        else:
            out.update(wi=dense.wi, wo=dense.wo)
        if stack == "decoder":
            cross = block.layer[1]
            out.update(
                xq=cross.EncDecAttention.q,
                xk=cross.EncDecAttention.k,
                xv=cross.EncDecAttention.v,
                xo=cross.EncDecAttention.o,
                norm_cross=cross.layer_norm,
            )
        return out

    def stack_extras(self, stack: str) -> dict[str, nn.Module]:
        s = getattr(self.model, stack)
        return {
            "final_norm": s.final_layer_norm,
            "position_bias": s.block[0].layer[0].SelfAttention.relative_attention_bias,
        }

    def lm_head(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs from labels: start token, then labels shifted by one (-100 -> pad)."""
        c = self.config
        start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.pad_token_id
        out = labels.new_full(labels.shape, start)
        out[..., 1:] = labels[..., :-1]
        return out.masked_fill(out == -100, c.pad_token_id)


Backbone = EncoderBackbone | T5Backbone


def backbone_adapter(model: object) -> Backbone:
    """The adapter for ``model``; ``TypeError``/``ValueError`` naming what is missing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} is not supported by kexue.lst: it has no .config "
            "(expected a Hugging Face transformers model)"
        )
    if getattr(config, "is_encoder_decoder", False):
        if getattr(config, "model_type", "") not in ("t5", "mt5"):
            raise ValueError(
                f"encoder-decoder model_type {getattr(config, 'model_type', '?')!r} is not "
                "supported by kexue.lst; supported: T5-style encoder-decoders (t5, mt5) "
                "and BERT-family encoders"
            )
        adapter: Backbone = T5Backbone(model)
    else:
        adapter = EncoderBackbone(model)
    adapter.check_forward()
    return adapter


@torch.no_grad()
def weights_checksum(model: nn.Module, *, exclude: str | None = None) -> str:
    """A cheap fingerprint of the weights (float64 sum and sum of squares), leaving out the
    parameters whose name contains ``exclude`` (e.g. ``"lora_"``)."""
    total = torch.zeros(2, dtype=torch.float64)
    for name, p in model.named_parameters():
        if exclude is not None and exclude in name:
            continue
        q = p.detach().double()
        total += torch.stack([q.sum(), q.square().sum()]).cpu()
    return f"{total[0].item():.10e}/{total[1].item():.10e}"


ARCHITECTURE_KEYS = ("family", "model_type", "width", "num_layers", "vocab_size")


def backbone_fingerprint(model: nn.Module, *, exclude: str | None = None) -> dict[str, object]:
    """What a saved side network or classifier records about its backbone: the architecture
    (:data:`ARCHITECTURE_KEYS`, checked on load), its class and name, and a weights checksum
    (a mismatch only warns; parameters named with ``exclude`` left out). Read from the config
    and the weights: no forward pass, no randomness."""
    c = model.config
    t5 = bool(getattr(c, "is_encoder_decoder", False))
    return {
        "family": T5Backbone.family if t5 else EncoderBackbone.family,
        "model_type": getattr(c, "model_type", None),
        "class": type(model).__name__,
        "width": getattr(c, "d_model" if t5 else "hidden_size", None),
        "num_layers": getattr(c, "num_layers" if t5 else "num_hidden_layers", None),
        "vocab_size": getattr(c, "vocab_size", None),
        "name_or_path": str(getattr(c, "_name_or_path", "") or ""),
        "checksum": weights_checksum(model, exclude=exclude),
    }


def check_fingerprint(saved: dict, here: dict, folder: object, *, weights: bool = True) -> None:
    """``ValueError`` naming the first architecture key that differs between the backbone a
    folder was trained on (``saved``) and this one (``here``); a warning when the weights'
    checksums differ (skipped with ``weights=False``)."""
    for key in ARCHITECTURE_KEYS:
        if saved.get(key) != here.get(key):
            raise ValueError(
                f"backbone mismatch: the model in {folder} was trained on a backbone with "
                f"{key}={saved.get(key)!r}, this one has {key}={here.get(key)!r}"
            )
    if weights and saved.get("checksum") != here.get("checksum"):
        warnings.warn(
            f"the backbone's weights differ from those the model in {folder} was trained "
            "with (checksum mismatch); results may differ",
            stacklevel=3,
        )


def load_backbone(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face folder: safetensors only (no pickle),
    no download. ``ValueError`` naming the folder when it is not one."""
    from transformers import AutoModel, AutoTokenizer

    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no .safetensors weights (pickled weights are not loaded)")
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
