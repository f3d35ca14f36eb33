"""Shared fixtures: a tokenizer and a tiny randomly initialised Llama, built offline in under a second."""

import os

import pytest
import torch

from aft.tiny import build_model, build_tokenizer

CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "3 + 4 = 7\n#### 7",
    "A box holds 12 pens. 5 boxes hold 12 * 5 = 60 pens.\n#### 60",
    "The answer is 42. Question: Answer: Step",
] * 20


@pytest.fixture(scope="session", autouse=True)
def kernel_dir(tmp_path_factory):
    """aft.kernels builds its C library into this run's own folder (the stages' subprocesses too), not the
    user's cache."""
    os.environ["AFT_KERNEL_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    return os.environ["AFT_KERNEL_DIR"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_model(tokenizer, size="test", seed=0)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """The tiny Llama and its tokenizer saved in a folder, as the stages load them."""
    folder = tmp_path_factory.mktemp("tiny")
    build_model(tokenizer, size="test", seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def make_llama(tokenizer):
    """A tiny LlamaForCausalLM of the test tokenizer's vocabulary whose ``heads`` query heads share
    ``kv_heads`` key/value heads (as SmolLM2's 9 share 3), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(hidden_size, intermediate_size, heads, kv_heads, seed):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()
    return make
