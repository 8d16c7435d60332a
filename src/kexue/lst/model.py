"""``LSTModel``: a frozen Hugging Face backbone with a trainable ladder side network beside it.

Reference: ``../shared/reference/ladder-side-tuning.md``. The backbone always runs in eval mode
under ``torch.no_grad()``: it only provides hidden states, so no activation of it is kept for
backward and backward runs through the side network only. Its hidden states depend on the
input alone, so they can be computed once per dataset and cached (``BackboneCache``).

Output: the side state is up-projected (``w -> d``; plus the backbone's last hidden state with
``merge_backbone_output``) and fed to a task head: a linear classifier on the pooled state
(``sequence-classification``), on every token (``token-classification``), or the frozen LM
head of T5 (``seq2seq-lm``; as in the paper, gradients flow through it into the side network,
never into it).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import (
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from kexue.io import atomic_write, write_json_atomic
from kexue.lst.backbones import Backbone, BackboneStates, backbone_adapter
from kexue.lst.config import LSTConfig
from kexue.lst.pruning import (
    PruningPlan,
    apply_pruning,
    fisher_importance,
    magnitude_importance,
    plan_pruning,
)
from kexue.lst.side import SideStack, init_side_weights, pool

CONFIG_NAME = "lst_config.json"
WEIGHTS_NAME = "lst_model.safetensors"
FORMAT_VERSION = 1


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters) of ``model``."""
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )


class SideNetwork(nn.Module):
    """Everything LST trains: side stack(s), up-projection and task head."""

    def __init__(self, adapter: Backbone, config: LSTConfig, layers: list[int]) -> None:
        super().__init__()
        dims = adapter.dims(config.reduction_factor)
        common = {"temperature": config.gate_temperature, "dropout": config.dropout}
        self.encoder = SideStack(dims, len(layers), **common)
        self.decoder = (
            SideStack(dims, len(layers), causal=True, cross=True, **common)
            if config.task == "seq2seq-lm"
            else None
        )
        self.up = nn.Linear(dims.width, dims.backbone_width)
        self.drop = nn.Dropout(config.dropout)
        self.head = (
            nn.Linear(dims.backbone_width, config.num_labels)
            if config.task != "seq2seq-lm"
            else None
        )

    def stacks(self) -> dict[str, SideStack]:
        out = {"encoder": self.encoder}
        if self.decoder is not None:
            out["decoder"] = self.decoder
        return out


class LSTModel(nn.Module):
    """A frozen backbone plus a trainable side network; build it with ``get_lst_model``.

    Attributes:
        backbone: the frozen model (``requires_grad`` False, always in eval mode).
        side: the ``SideNetwork``; its parameters are the only trainable ones.
        config: the ``LSTConfig``.
        side_layers_: backbone layer indices that have a side block.
        pruning_plan_: the rows kept by the pruning initialisation (``None`` for random).
    """

    def __init__(
        self, backbone: nn.Module, config: LSTConfig, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(config, LSTConfig):
            raise TypeError(f"config must be an LSTConfig, got {type(config).__name__}")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        was_training = backbone.training
        backbone.eval()
        try:
            adapter = backbone_adapter(backbone)
        except Exception:
            backbone.train(was_training)
            raise
        self.side_layers_ = _check_layers(config, adapter)
        if config.task == "seq2seq-lm":
            if adapter.family != "t5" or adapter.lm_head() is None:
                raise ValueError(
                    "task='seq2seq-lm' needs a T5 backbone with an LM head "
                    f"(T5ForConditionalGeneration), got {type(backbone).__name__}"
                )
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone
        self.config = config
        self._adapter = adapter
        self.side = SideNetwork(adapter, config, self.side_layers_)
        std = getattr(backbone.config, "initializer_range", None) or 0.02
        init_side_weights(self.side, std, generator)
        self.pruning_plan_: PruningPlan | None = None

    # -- PEFT-style API ---------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        return self.backbone

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as in PEFT."""
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def merge_and_unload(self) -> nn.Module:
        raise NotImplementedError(
            "Ladder Side-Tuning cannot be merged into the backbone: the side network is a "
            "separate network that runs beside the frozen backbone, not a change of its "
            "weights. Keep the LSTModel, or save only the side network with save_pretrained()."
        )

    def train(self, mode: bool = True) -> LSTModel:
        super().train(mode)
        self.backbone.eval()  # frozen features: no dropout, so they can be cached
        return self

    def gate_values(self) -> dict[str, Tensor]:
        """``mu_j = sigmoid(alpha_j / T)`` per side block, for each side stack."""
        return {name: s.gates().detach().clone() for name, s in self.side.stacks().items()}

    # -- forward ------------------------------------------------------------------------------

    @torch.no_grad()
    def backbone_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> BackboneStates:
        """The hidden states the side network reads (computed without autograd)."""
        self.backbone.eval()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.task == "seq2seq-lm" and decoder_input_ids is None:
            if labels is None:
                raise ValueError("task='seq2seq-lm' needs labels or decoder_input_ids")
            decoder_input_ids = self._adapter.shift_right(labels)
        return self._adapter.states(
            self.side_layers_,
            self.config.merge_backbone_output,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        backbone_states: BackboneStates | None = None,
        return_dict: bool = True,
    ):
        """Logits (and the loss when ``labels`` are given) in a transformers output.

        Pass ``backbone_states`` (from ``backbone_states()`` or a ``BackboneCache``) to skip
        the backbone; then ``attention_mask`` is required and ``input_ids`` is not.
        """
        cfg = self.config
        if backbone_states is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids (or backbone_states)")
            backbone_states = self.backbone_states(
                input_ids,
                attention_mask,
                token_type_ids,
                decoder_input_ids,
                decoder_attention_mask,
                labels,
            )
        if attention_mask is None:
            if input_ids is None:
                raise ValueError("with backbone_states, pass the attention_mask too")
            attention_mask = torch.ones_like(input_ids)
        enc = self.side.encoder(backbone_states.encoder, attention_mask)
        if cfg.task == "seq2seq-lm":
            dec_states = backbone_states.decoder
            if dec_states is None:
                raise ValueError("backbone_states lacks the decoder states (seq2seq-lm)")
            if decoder_attention_mask is None:
                decoder_attention_mask = torch.ones(
                    dec_states.shape[1:3], dtype=torch.long, device=dec_states.device
                )
            h = self.side.decoder(dec_states, decoder_attention_mask, enc, attention_mask)
            h = self._up(h, backbone_states.decoder_last)
            c = self.backbone.config  # T5 scales before a tied LM head (v1.0, not v1.1)
            if getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", False)):
                h = h * self._adapter.width**-0.5
            logits = F.linear(h, self._adapter.lm_head().weight)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            out = Seq2SeqLMOutput(loss=loss, logits=logits)
        else:
            h = self._up(enc, backbone_states.encoder_last)
            if cfg.task == "sequence-classification":
                h = pool(h, attention_mask, cfg.pooling)
            logits = self.side.head(self.side.drop(h))
            loss = None if labels is None else self._loss(logits, labels)
            kind = (
                SequenceClassifierOutput
                if cfg.task == "sequence-classification"
                else TokenClassifierOutput
            )
            out = kind(loss=loss, logits=logits)
        return out if return_dict else out.to_tuple()

    def _up(self, h: Tensor, last: Tensor | None) -> Tensor:
        h = self.side.up(h)
        if self.config.merge_backbone_output:
            h = h + last.to(h.dtype)
        return h

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100
        )

    # -- saving -------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        c = self.backbone.config
        return {
            "family": self._adapter.family,
            "model_type": getattr(c, "model_type", None),
            "class": type(self.backbone).__name__,
            "width": self._adapter.width,
            "num_layers": self._adapter.num_layers,
            "vocab_size": getattr(c, "vocab_size", None),
            "name_or_path": str(getattr(c, "_name_or_path", "") or ""),
            "checksum": _checksum(self.backbone),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write only the side network: ``lst_model.safetensors`` + ``lst_config.json``.

        Each file is written to a temporary file in the same folder and renamed into place,
        so a crash never leaves a half-written checkpoint.
        """
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.side.state_dict().items()}
        meta = {
            "format": "kexue.lst",
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "side_layers": self.side_layers_,
            "backbone": self._fingerprint(),
        }
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, p, {"format": "pt"}))
        write_json_atomic(folder / CONFIG_NAME, meta)

    @classmethod
    def from_pretrained(
        cls, backbone: nn.Module, pretrained_directory: str | os.PathLike
    ) -> LSTModel:
        """Rebuild the side network saved by ``save_pretrained`` beside ``backbone``.

        Reads JSON and safetensors only (no pickle). ``ValueError`` if the backbone's
        architecture differs from the one the side network was trained on; a warning if its
        weights differ (checksum).
        """
        from safetensors.torch import load_file

        folder = Path(pretrained_directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found (not an LST checkpoint?)")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        if meta.get("format") != "kexue.lst":
            raise ValueError(f"{folder / CONFIG_NAME} is not a kexue.lst config")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{folder} was written by a newer kexue (format {meta['format_version']})"
            )
        model = cls(
            backbone, LSTConfig.from_dict(meta["config"])
        )  # init only matters in get_lst_model
        saved, here = meta["backbone"], model._fingerprint()
        for key in ("family", "model_type", "width", "num_layers", "vocab_size"):
            if saved.get(key) != here.get(key):
                raise ValueError(
                    f"backbone mismatch: the side network in {folder} was trained on a backbone "
                    f"with {key}={saved.get(key)!r}, this one has {key}={here.get(key)!r}"
                )
        if saved.get("checksum") != here["checksum"]:
            warnings.warn(
                f"the backbone's weights differ from those the side network in {folder} was "
                "trained with (checksum mismatch); results may differ",
                stacklevel=2,
            )
        state = load_file(str(folder / WEIGHTS_NAME))
        model.side.load_state_dict(state, strict=True)
        return model


def _check_layers(config: LSTConfig, adapter: Backbone) -> list[int]:
    n = min(adapter.stacks().values())
    if config.side_layers is None:
        return list(range(n))
    bad = [i for i in config.side_layers if i >= n]
    if bad:
        raise ValueError(
            f"side_layers {bad} out of range: the backbone has {n} layers (0..{n - 1})"
        )
    return list(config.side_layers)


@torch.no_grad()
def _checksum(model: nn.Module) -> str:
    """A cheap fingerprint of the weights (float64 sum and sum of squares)."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        q = p.detach().double()
        total += torch.stack([q.sum(), q.square().sum()])
    return f"{total[0].item():.10e}/{total[1].item():.10e}"


def get_lst_model(
    backbone: nn.Module,
    config: LSTConfig,
    *,
    init_data: Iterable[dict[str, Tensor]] | None = None,
    generator: torch.Generator | None = None,
) -> LSTModel:
    """Freeze ``backbone`` and build the side network of ``config`` beside it.

    Args:
        backbone: a BERT-family encoder or a T5 encoder-decoder (transformers model).
        config: the ``LSTConfig``.
        init_data: batches (dicts of ``input_ids``, ``attention_mask``, ``labels`` ...) for the
            Fisher pass; required when ``config.init == "fisher"``.
        generator: randomness of the random weights (every weight with ``init="random"``; the
            head and any unpruned part otherwise).

    Returns:
        The ``LSTModel``. With a pruning init, ``model.pruning_plan_`` holds the kept rows.

    Raises:
        TypeError / ValueError: naming the argument (unsupported backbone, side_layers out of
            range, a reduction_factor that does not divide the widths, missing init_data).
    """
    if not isinstance(config, LSTConfig):
        raise TypeError(f"config must be an LSTConfig, got {type(config).__name__}")
    if config.init == "fisher" and init_data is None:
        raise ValueError(
            "init='fisher' needs init_data (batches with input_ids and labels); "
            "use init='magnitude' or 'random' to build without data"
        )
    model = LSTModel(backbone, config, generator=generator)
    if config.init != "random":
        adapter, layers = model._adapter, model.side_layers_
        if config.init == "fisher":
            importance = fisher_importance(
                adapter,
                layers,
                init_data,
                samples=config.fisher_samples,
                task=config.task,
                num_labels=config.num_labels,
                pooling=config.pooling,
            )
        else:
            importance = magnitude_importance(adapter, layers)
        dims = adapter.dims(config.reduction_factor)
        plan = plan_pruning(importance, adapter, layers, dims)
        apply_pruning(model.side.stacks(), model.side.up, adapter, plan)
        model.pruning_plan_ = plan
    return model


class BackboneCache:
    """The backbone states of a fixed dataset, computed once and kept per example.

    Later epochs then run only the side network: ``states, mask = cache.batch(indices)`` and
    ``model(attention_mask=mask, backbone_states=states, labels=...)``. Examples are stored
    without padding, so batches can be re-drawn every epoch. ``dtype=torch.float16`` halves
    the memory (the side network computes in its own dtype).

    Only valid while the input is fixed (no augmentation) and the backbone unchanged.
    """

    def __init__(
        self,
        model: LSTModel,
        batches: Iterable[dict[str, Tensor]],
        *,
        dtype: torch.dtype | None = None,
        on_batch: Callable[[], object] | None = None,
    ) -> None:
        if not isinstance(model, LSTModel):
            raise TypeError(f"model must be an LSTModel, got {type(model).__name__}")
        if model.config.task == "seq2seq-lm":
            raise ValueError("BackboneCache supports the classification tasks only")
        self.states: list[Tensor] = []
        self.lasts: list[Tensor | None] = []
        for batch in batches:
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(batch["input_ids"])
            out = model.backbone_states(batch["input_ids"], mask, batch.get("token_type_ids"))
            for i in range(mask.shape[0]):
                keep = mask[i].bool()
                s = out.encoder[:, i, keep]
                self.states.append(s if dtype is None else s.to(dtype))  # masking already copied
                last = out.encoder_last
                self.lasts.append(None if last is None else last[i, keep].to(dtype or last.dtype))
            if on_batch is not None:
                on_batch()

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states) + sum(
            t.numel() * t.element_size() for t in self.lasts if t is not None
        )

    def batch(self, indices: Sequence[int]) -> tuple[BackboneStates, Tensor]:
        """Padded states (1 + blocks, batch, seq, d) of ``indices`` and their attention mask."""
        parts = [self.states[i] for i in indices]
        t = max(p.shape[1] for p in parts)
        first = parts[0]
        out = first.new_zeros((first.shape[0], len(parts), t, first.shape[2]))
        mask = torch.zeros(len(parts), t, dtype=torch.long)
        last = None
        if self.lasts[indices[0]] is not None:
            last = first.new_zeros((len(parts), t, first.shape[2]))
        for j, (i, p) in enumerate(zip(indices, parts, strict=True)):
            out[:, j, : p.shape[1]] = p
            mask[j, : p.shape[1]] = 1
            if last is not None:
                last[j, : p.shape[1]] = self.lasts[i]
        return BackboneStates(out, last), mask
