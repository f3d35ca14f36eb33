"""A tokenizer and a small Llama built from scratch, offline: the demo's model and the tests' fixtures.

Nothing here downloads: the tokenizer is a byte-level BPE trained in well under a second on the texts
given, with digits split one per token (small models learn arithmetic far better when "1234" is four
tokens), and the model is a randomly initialised ``LlamaForCausalLM``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# name -> (hidden size, layers, heads); intermediate size is 8/3 hidden as in Llama.
MODEL_SIZES = {
    "test": (32, 2, 4),
    "demo": (192, 4, 4),
    "small": (256, 6, 4),
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (digits always split into single tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_model(tokenizer, size: str = "demo", max_length: int = 512, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``MODEL_SIZES[size]``, matching ``tokenizer``'s vocabulary."""
    import torch

    hidden, layers, heads = MODEL_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
