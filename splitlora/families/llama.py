"""Rotary decoders with Llama's layout and forward: Llama, Mistral (sliding window), Qwen2 (q/k/v biases),
Qwen3 (q/k norms), OLMo 2 (norms after attention and MLP), OLMo 3 (and sliding windows, with a rotary
table per kind of layer), SmolLM3 (layers without rotary positions).
What differs between them lives inside their blocks, which the split calls as the model's forward does."""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Olmo2Config, Olmo3Config, Qwen2Config, Qwen3Config, SmolLM3Config

from .base import Family

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _ids(vocab: int) -> dict:
    """The byte tokenizer's ids: the last two of the vocabulary are end-of-text and padding."""
    return dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 2, pad_token_id=vocab - 1)


FAMILIES = [
    # tied head, GQA (4 query heads, 2 kv heads); the `tiny-llama` preset the tests have always used
    Family("llama", lambda v: LlamaConfig(
        **_ids(v), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    # untied head, a sliding window shorter than the test sequences
    Family("mistral", lambda v: MistralConfig(**_ids(v), **SMALL, sliding_window=4, tie_word_embeddings=False)),
    # q, k, v biases; sliding-window layers above max_window_layers (per-layer types)
    Family("qwen2", lambda v: Qwen2Config(**_ids(v), **SMALL, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=2, tie_word_embeddings=True)),
    # multi-query attention (one kv head), head_dim not hidden / heads
    Family("qwen3", lambda v: Qwen3Config(**_ids(v), **{**SMALL, "num_key_value_heads": 1}, head_dim=16,
                                         tie_word_embeddings=False)),
    Family("olmo2", lambda v: Olmo2Config(**_ids(v), **SMALL, tie_word_embeddings=False)),
    # OLMo 3: OLMo 2's blocks, sliding-window and full layers, a rotary table per kind of layer
    Family("olmo3", lambda v: Olmo3Config(**_ids(v), **SMALL, sliding_window=4, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"], tie_word_embeddings=False),
        rotary_by_layer_type=True),
    Family("smollm3", lambda v: SmolLM3Config(**_ids(v), **SMALL, no_rope_layer_interval=2,
                                             tie_word_embeddings=True)),
]
