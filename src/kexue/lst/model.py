"""``LSTModel``: a frozen Hugging Face backbone with a trainable ladder side network beside it.

See ``docs/guides/lst.md``. The backbone always runs in eval mode under ``torch.no_grad()``:
it only provides hidden states, so no activation of it is kept for backward and backward runs
through the side network only. Its hidden states depend on the input alone, so they can be
computed once per dataset and cached (``BackboneCache``).

Output: the side state is up-projected (``w -> d``; plus the backbone's last hidden state with
``merge_backbone_output``) and fed to a task head: a linear classifier on the pooled state
(``sequence-classification``), on every token (``token-classification``), or the frozen LM
head of T5 (``seq2seq-lm``; as in the paper, gradients flow through it into the side network,
never into it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import (
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from kexue.exceptions import CheckpointError
from kexue.lst.backbones import (
    Backbone,
    BackboneStates,
    T5Backbone,
    backbone_adapter,
    backbone_fingerprint,
    check_fingerprint,
)
from kexue.lst.config import LSTConfig
from kexue.lst.data import right_pad
from kexue.lst.pruning import (
    PruningPlan,
    apply_pruning,
    fisher_importance,
    magnitude_importance,
    plan_pruning,
)
from kexue.lst.side import SideStack, init_side_weights, pool
from kexue.pretrained import CONFIG_NAME, load_folder, save_folder
from kexue.progress import progress_bar
from kexue.validation import check_class_labels, describe

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

LST_KIND = "kexue.lst.LSTModel"
FORMAT_VERSION = 1
WEIGHTS_STEM = "side_network"  # side_network.safetensors beside config.json


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
        common: dict[str, Any] = {"temperature": config.gate_temperature, "dropout": config.dropout}
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
        backbone_autocast: ``None`` (default) or ``torch.bfloat16`` / ``torch.float16``: run
            the backbone's forward under ``torch.autocast`` to that dtype (mixed precision;
            ``docs/guides/lst.md``, "Mixed precision"). The side network keeps its own dtype
            (float32): it reads the states cast back to it. Not saved with the model.
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
        self.backbone_autocast: torch.dtype | None = None

    # -- PEFT-style API ---------------------------------------------------------------------

    @property
    def backbone_adapter(self) -> Backbone:
        """How the side network reads the backbone (its layers, widths and modules)."""
        return self._adapter

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
            # seq2seq-lm needs a T5 backbone (checked in __init__)
            decoder_input_ids = cast(T5Backbone, self._adapter).shift_right(labels)
        amp = self.backbone_autocast
        with torch.autocast(input_ids.device.type, dtype=amp, enabled=amp is not None):
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
        the backbone; then ``attention_mask`` is required and ``input_ids`` is not. The
        computation is that of ``docs/guides/lst.md``, "The side network".

        Raises:
            ValueError: ``labels`` outside ``0..num_labels-1`` (token ids outside the
                vocabulary for ``seq2seq-lm``; -100 marks ignored positions), named with
                ``num_labels`` (``vocab_size``) and the first bad label.
        """
        cfg = self.config
        if labels is not None:
            self._check_labels(labels)
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
        out: ModelOutput
        if cfg.task == "seq2seq-lm":
            dec_states = backbone_states.decoder
            if dec_states is None:
                raise ValueError("backbone_states lacks the decoder states (seq2seq-lm)")
            if decoder_attention_mask is None:
                decoder_attention_mask = torch.ones(
                    dec_states.shape[1:3], dtype=torch.long, device=dec_states.device
                )
            decoder = cast(SideStack, self.side.decoder)  # built for seq2seq-lm
            h = decoder(dec_states, decoder_attention_mask, enc, attention_mask)
            h = self._up(h, backbone_states.decoder_last)
            c = self.backbone.config  # T5 scales before a tied LM head (v1.0, not v1.1)
            if getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", False)):
                h = h * self._adapter.width**-0.5
            lm_head = cast(nn.Linear, self._adapter.lm_head())  # checked in __init__
            logits = F.linear(h, lm_head.weight)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            out = Seq2SeqLMOutput(loss=loss, logits=logits)
        else:
            h = self._up(enc, backbone_states.encoder_last)
            if cfg.task == "sequence-classification":
                h = pool(h, attention_mask, cfg.pooling)
            head = cast(nn.Linear, self.side.head)  # built for every task but seq2seq-lm
            logits = head(self.side.drop(h))
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
            # the backbone's last states come with merge_backbone_output
            h = h + cast(Tensor, last).to(h.dtype)
        return h

    def _check_labels(self, labels: Tensor) -> None:
        """Class indices below ``num_labels`` (token ids below ``vocab_size`` for seq2seq-lm),
        -100 = ignored; checked before the backbone runs."""
        if self.config.task == "seq2seq-lm":
            lm_head = cast(nn.Linear, self._adapter.lm_head())  # checked in __init__
            vocab = lm_head.weight.shape[0]
            check_class_labels(labels, vocab, count_name="vocab_size", ignore_index=-100)
        elif self.config.num_labels > 1:
            check_class_labels(
                labels, self.config.num_labels, count_name="num_labels", ignore_index=-100
            )

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100
        )

    # -- saving -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write only the side network: ``side_network.safetensors`` + ``config.json``.

        The config holds the ``LSTConfig`` (``"lst_config"``), the side layers and a
        fingerprint of the backbone (architecture and a weights checksum); the backbone
        itself is the user's and is not saved (as PEFT saves only the adapter). Files are
        written atomically, tensors first; see :mod:`kexue.pretrained`.
        """
        config = {
            "lst_config": self.config.to_dict(),
            "side_layers": list(self.side_layers_),
            "backbone": backbone_fingerprint(self.backbone),
        }
        return save_folder(
            save_directory,
            kind=LST_KIND,
            version=FORMAT_VERSION,
            config=config,
            tensors={WEIGHTS_STEM: self.side.state_dict()},
            extra="lst",
        )

    @classmethod
    def from_pretrained(
        cls, backbone: nn.Module, pretrained_directory: str | os.PathLike
    ) -> LSTModel:
        """Rebuild the side network saved by ``save_pretrained`` beside ``backbone``.

        Reads JSON and safetensors only (no pickle); the result is bit-identical to the
        saved model and in eval mode (call ``.train()`` to train on).

        Raises:
            FileNotFoundError: the folder does not exist.
            CheckpointError: it is not a saved LST side network, or a file does not match
                its recorded SHA-256 (:mod:`kexue.exceptions`).
            ValueError: ``backbone``'s architecture differs from the one the side network
                was trained on; a warning if only its weights differ (checksum).
        """
        config, tensors = load_lst_folder(pretrained_directory)
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
            model = cls(backbone, LSTConfig.from_dict(config["lst_config"]))
        check_fingerprint(config["backbone"], backbone_fingerprint(backbone), pretrained_directory)
        if list(config.get("side_layers", [])) != model.side_layers_:
            raise CheckpointError(
                f"{pretrained_directory}: side_layers {config.get('side_layers')} do not match "
                f"its lst_config ({model.side_layers_})"
            )
        try:
            model.side.load_state_dict(tensors[WEIGHTS_STEM], strict=True)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(
                f"{pretrained_directory}: the saved side network does not match its config: "
                f"{' '.join(str(err).split())[:300]}"
            ) from None
        return model.eval()


def existing_folder(folder: object) -> Path:
    """``folder`` as a ``Path``: ``TypeError`` unless a path, ``FileNotFoundError`` unless an
    existing folder."""
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"pretrained_directory must be a folder path, got {describe(folder)}")
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected one written by save_pretrained)")
    return path


def load_lst_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """``(config, tensors)`` of a folder written by ``LSTModel.save_pretrained``, checked."""
    path = existing_folder(folder)
    if not (path / CONFIG_NAME).is_file() and (path / "lst_config.json").is_file():
        raise CheckpointError(
            f"{path} holds a side network in the format of an earlier kexue (lst_config.json), "
            "which this version does not read; train again or load it with that version and "
            "save_pretrained() again"
        )
    return load_folder(path, kind=LST_KIND, version=FORMAT_VERSION, extra="lst")


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


def get_lst_model(
    backbone: nn.Module,
    config: LSTConfig,
    *,
    init_data: Iterable[dict[str, Tensor]] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> LSTModel:
    """Freeze ``backbone`` and build the side network of ``config`` beside it.

    Args:
        backbone: a BERT-family encoder or a T5 encoder-decoder (transformers model).
        config: the ``LSTConfig``.
        init_data: batches (dicts of ``input_ids``, ``attention_mask``, ``labels`` ...) for the
            Fisher pass; required when ``config.init == "fisher"``.
        generator: randomness of the random weights (every weight with ``init="random"``; the
            head and any unpruned part otherwise).
        progress: show a progress bar during the Fisher pass.

    Returns:
        The ``LSTModel``. With a pruning init, ``model.pruning_plan_`` holds the kept rows
        (``docs/guides/lst.md``, "Initialisation by pruning").

    Raises:
        TypeError / ValueError: naming the argument (unsupported backbone, side_layers out of
            range, a reduction_factor that does not divide the widths, missing init_data,
            labels of init_data outside ``0..num_labels-1``).
    """
    if not isinstance(config, LSTConfig):
        raise TypeError(f"config must be an LSTConfig, got {describe(config)}")
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
                cast("Iterable[dict[str, Tensor]]", init_data),  # checked above for fisher
                samples=config.fisher_samples,
                task=config.task,
                num_labels=config.num_labels,
                pooling=config.pooling,
                progress=progress,
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

    Only valid while the input is fixed (no augmentation) and the backbone unchanged
    (``docs/guides/lst.md``, "Caching the backbone").
    """

    def __init__(
        self,
        model: LSTModel,
        batches: Iterable[dict[str, Tensor]],
        *,
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, LSTModel):
            raise TypeError(f"model must be an LSTModel, got {describe(model)}")
        if model.config.task == "seq2seq-lm":
            raise ValueError("BackboneCache supports the classification tasks only")
        self.states: list[Tensor] = []
        self.lasts: list[Tensor | None] = []
        total = len(batches) if isinstance(batches, Sequence) else None
        with progress_bar(disable=not progress) as bar:
            task = bar.add_task("caching the backbone states", total=total)
            for batch in batches:
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(batch["input_ids"])
                out = model.backbone_states(batch["input_ids"], mask, batch.get("token_type_ids"))
                for i in range(mask.shape[0]):
                    keep = mask[i].bool()
                    s = out.encoder[:, i, keep]
                    self.states.append(s if dtype is None else s.to(dtype))  # masking copied
                    last = out.encoder_last
                    self.lasts.append(
                        None if last is None else last[i, keep].to(dtype or last.dtype)
                    )
                bar.advance(task)

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states) + sum(
            t.numel() * t.element_size() for t in self.lasts if t is not None
        )

    def batch(self, indices: Sequence[int]) -> tuple[BackboneStates, Tensor]:
        """Padded states (1 + blocks, batch, seq, d) of ``indices`` and their attention mask."""
        states, mask = right_pad([self.states[i] for i in indices], dim=1)
        last = None
        if self.lasts[indices[0]] is not None:
            # lasts are all tensors or all None (merge_backbone_output)
            last, _ = right_pad([cast(Tensor, self.lasts[i]) for i in indices])
        return BackboneStates(states, last), mask
