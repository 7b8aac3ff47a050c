"""Cut a transformers causal LM at a split layer into a client part and a server part.

The client part is embeddings + blocks [0, k); the server part is blocks [k, L) + final norm + LM head.
Blocks, embeddings, norms, rotary tables and masks are the transformers modules and helpers themselves;
the model's family (families/) says which modules a part needs and calls them the way the model's own
forward does (GPT-2: learned positions added once, on the client; rotary decoders: the tables on both
sides; Gemma 2: soft-capped logits on the part with the head). Both parts rebuild the causal/padding
mask and the position ids from the 2-D attention mask that travels with the batch.
"""

from __future__ import annotations

import copy

import torch
import torch.utils.checkpoint
from torch import nn

from .errors import SplitError
from .families import Family, family_of

def num_layers(config) -> int:
    return config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer


class ModelPart(nn.Module):
    """Blocks [start, stop) of a causal LM, with the embeddings if start == 0 and the head if stop == L.

    `adapter` maps PEFT adapter-file keys to this part's LoRA parameters, so a part's adapter state is
    a slice of the whole model's PEFT adapter and parts can be stitched back into one adapter file.
    """

    def __init__(self, family: Family, config, mods: dict, start: int, stop: int, adapter: dict):
        super().__init__()
        self.family, self.config, self.start, self.stop = family, config, start, stop
        total = num_layers(config)
        self.has_embeddings, self.has_head = start == 0, stop == total
        drop = {"blocks", *(() if self.has_embeddings else family.embed_modules),
                *(() if self.has_head else family.head_modules)}
        self.mods = nn.ModuleDict({k: v for k, v in mods.items() if k not in drop})
        self.blocks = nn.ModuleList(list(mods["blocks"])[start:stop])
        self.adapter = adapter
        self.checkpointing = False   # recompute each block in backward (runtime.gradient_checkpointing)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache=None, logits_to_keep: int = 0) -> torch.Tensor:
        """Token ids (client, start == 0) or smashed activations in; activations or logits out.

        Training passes (x, attention_mask): right padding, positions 0..T-1. Decoding also passes the
        position ids, a transformers KV cache (layers are indexed globally, so one cache can serve both
        parts) and `logits_to_keep` (>0: only the last positions go through the LM head).
        """
        fam, config = self.family, self.config
        if position_ids is None:
            position_ids = fam.positions(x, attention_mask)
        h = fam.embed(config, self.mods, x, position_ids) if self.has_embeddings else x
        ctx = {**fam.extra(config, self.mods, h, position_ids), "cache": cache}
        mask = fam.masks(config, h, attention_mask, position_ids, cache, range(self.start, self.stop))
        recompute = self.checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks, start=self.start):
            if recompute:   # the RNG state is restored for the recomputation: the same dropout masks
                h = torch.utils.checkpoint.checkpoint(fam.block, config, block, h, mask(i), ctx, i,
                                                      use_reentrant=False)
            else:
                h = fam.block(config, block, h, mask(i), ctx, i)
        if not self.has_head:
            return h
        return fam.head(config, self.mods, h[:, -logits_to_keep:] if logits_to_keep else h)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.adapter.items()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self.adapter) - set(state), set(state) - set(self.adapter)
        if missing or unexpected:
            raise KeyError(f"adapter state does not fit this part: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
        for k, p in self.adapter.items():
            p.copy_(state[k])

    def view(self, start: int) -> "ModelPart":
        """Blocks [start, stop) of this part (start >= self.start), sharing its modules and LoRA parameters:
        what a server runs for a client whose split is deeper than the server part's first block."""
        blocks = [None] * self.start + list(self.blocks)
        view = ModelPart(self.family, self.config, {**dict(self.mods), "blocks": blocks}, start, self.stop, {})
        ids = {id(p) for p in view.blocks.parameters()}
        view.adapter = {k: p for k, p in self.adapter.items() if id(p) in ids}
        return view

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.parameters() if p.device.type != "meta")

    def replicate(self, device: torch.device | str | None = None) -> "ModelPart":
        """A copy with its own LoRA parameters; frozen weights and buffers stay shared (no memory cost),
        unless `device` is another device: then the copy holds its own frozen weights there."""
        if device is not None and torch.device(device) != self.device:
            from .models import to_device
            copied = copy.deepcopy(self)
            to_device(copied, device)
            return copied
        from .quantize import shared_tensors

        memo = {id(t): t for t in [*self.parameters(), *self.buffers(), *shared_tensors(self)] if not t.requires_grad}
        return copy.deepcopy(self, memo)


def set_checkpointing(part, on: bool) -> None:
    """Gradient checkpointing for a part (a UPart: both its parts)."""
    for p in (part.bottom, part.top) if isinstance(part, UPart) else (part,):
        p.checkpointing = on


def lora_layers(part) -> dict[str, nn.Module]:
    """PEFT key prefix (the adapter-file key less `.lora_A.weight`) -> the part's LoRA layer of it."""
    prefixes = {id(p): k.rsplit(".lora_", 1)[0] for k, p in part.adapter.items()}
    return {prefixes[id(m.lora_A["default"].weight)]: m for m in part.modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A and id(m.lora_A["default"].weight) in prefixes}


def lora_targets(peft_model) -> dict[tuple[int, str], str]:
    """(block, module name within the block) -> PEFT key prefix, for every LoRA module of the model."""
    part = full_part(peft_model)
    ids = {id(m): prefix for prefix, m in lora_layers(part).items()}
    return {(b, name): ids[id(m)] for b, block in enumerate(part.blocks) for name, m in block.named_modules()
            if id(m) in ids}


def base_weight(layer: nn.Module) -> torch.Tensor:
    """A LoRA layer's frozen base weight as [out, in] (a view: GPT-2's Conv1D stores [in, out])."""
    w = layer.base_layer.weight
    return w.T if layer.fan_in_fan_out else w


@torch.no_grad()
def own_base_weight(layer: nn.Module, value: torch.Tensor | None = None) -> torch.Tensor:
    """Give a LoRA layer a base weight of its own (a copy of `value`, [out, in], or of its current one) so
    an update folded into it stays with this part; returns the [out, in] view."""
    w = layer.base_layer.weight
    new = (base_weight(layer) if value is None else value).to(w.device, w.dtype)
    layer.base_layer.weight = nn.Parameter((new.T if layer.fan_in_fan_out else new).contiguous().clone(),
                                           requires_grad=False)
    layer.base_layer.weight.owned = True
    return base_weight(layer)


def client_part(peft_model, split_layer: int, top_layers: int = 0):
    """What a client holds at `split_layer`: embeddings + blocks [0, k), and with a U-shaped split
    (`top_layers` = m) blocks [L − m, L) and the head too (shares the model's modules: replicate())."""
    return split_u(peft_model, split_layer, top_layers)[0] if top_layers else split_model(peft_model, split_layer)[0]


def adapter_keys(peft_model) -> dict[int, str]:
    """id(param) -> the key PEFT writes for it in adapter_model.safetensors."""
    keys = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            adapter_name = peft_model.active_adapter
            keys[id(p)] = name.replace(f".{adapter_name}", "")
    return keys


def make_part(peft_model, start: int, stop: int) -> ModelPart:
    """A view of layers [start, stop) of a PEFT-wrapped model (shares its modules; call replicate())."""
    hf = peft_model.get_base_model()
    fam = family_of(hf.config)
    mods = fam.modules(hf)
    keys = adapter_keys(peft_model)
    part = ModelPart(fam, hf.config, mods, start, stop, {})
    part.adapter = {keys[id(p)]: p for p in part.parameters() if id(p) in keys}
    return part


def split_model(peft_model, split_layer: int) -> tuple[ModelPart, ModelPart]:
    """(client part, server part) cut after block `split_layer - 1`; 1 <= split_layer < L."""
    total = num_layers(peft_model.get_base_model().config)
    if not 1 <= split_layer < total:
        raise SplitError(f"model.split_layer: {split_layer} is out of range; this model has {total} layers, "
                         f"so it must be between 1 and {total - 1}")
    return make_part(peft_model, 0, split_layer), make_part(peft_model, split_layer, total)


def full_part(peft_model) -> ModelPart:
    return make_part(peft_model, 0, num_layers(peft_model.get_base_model().config))


class UPart(nn.Module):
    """A U-shaped client's two parts: the bottom (embeddings + blocks [0, k)) and the top (blocks
    [L − m, L) + final norm + LM head), trained by one optimizer and stitched into one adapter slice.
    Calling it runs the bottom; `top` maps the server's activations to logits."""

    def __init__(self, bottom: ModelPart, top: ModelPart):
        super().__init__()
        self.bottom, self.top = bottom, top
        self.config, self.has_head, self.has_embeddings = bottom.config, True, True

    @property
    def adapter(self) -> dict:
        return {**self.bottom.adapter, **self.top.adapter}

    def forward(self, x, attention_mask, position_ids=None, cache=None, logits_to_keep: int = 0):
        return self.bottom(x, attention_mask, position_ids, cache)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.bottom.trainable_parameters() + self.top.trainable_parameters()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {**self.bottom.adapter_state(), **self.top.adapter_state()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.adapter):
            raise KeyError("adapter state does not fit this U-shaped client")
        self.bottom.load_adapter_state({k: state[k] for k in self.bottom.adapter})
        self.top.load_adapter_state({k: state[k] for k in self.top.adapter})

    def replicate(self, device: torch.device | str | None = None) -> UPart:
        return UPart(self.bottom.replicate(device), self.top.replicate(device))


def split_u(peft_model, split_layer: int, top_layers: int) -> tuple[UPart, ModelPart]:
    """(client, server) of a U-shaped split: the client holds blocks [0, k) and [L − m, L) with the
    embeddings, final norm and LM head (tied to the embeddings), so no token or label leaves it; the
    server holds blocks [k, L − m)."""
    total = num_layers(peft_model.get_base_model().config)
    if not (1 <= split_layer and top_layers >= 1 and split_layer + top_layers < total):
        raise SplitError(f"model.split_layer / model.top_layers: {split_layer} + {top_layers} must leave the "
                         f"server at least one of the {total} blocks (k >= 1, m >= 1, k + m < {total})")
    client = UPart(make_part(peft_model, 0, split_layer), make_part(peft_model, total - top_layers, total))
    return client, make_part(peft_model, split_layer, total - top_layers)
