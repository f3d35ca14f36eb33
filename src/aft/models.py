"""Loading and saving checkpoints: any Hugging Face causal LM, its tokenizer, and LoRA adapters.

Models are fetched the ordinary Hugging Face way (a hub name or a local folder, the hub's cache and
``HF_HUB_OFFLINE`` apply); weights load from safetensors only, and remote code runs only when the user
passes ``trust_remote_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class ModelFields:
    """What every stage that loads a model needs; shared by the stage configs (and so by the CLI flags)."""

    model: str = field(default="", metadata={"help": "Hub name or local folder of the causal LM to start from."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to use, if not the model's own."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run model code shipped with the checkpoint. Off unless you trust its source."})
    model_dtype: str = field(default="float32", metadata={
        "help": "Weights' dtype when loading: float32, bfloat16, float16 or auto. For mixed-precision "
                "training keep float32 and pass --bf16."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names LoRA adapts, or 'all-linear'."})


def load_tokenizer(name: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # Llama-family tokenizers ship without one; padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False):
    if dtype not in DTYPES:
        raise ValueError(f"model_dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    return AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                use_safetensors=True)


def load_for_training(cfg: ModelFields):
    """Model and tokenizer for a training stage, with LoRA adapters attached when ``lora_r > 0``."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    model = load_model(cfg.model, cfg.model_dtype, cfg.trust_remote_code)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, tokenizer


def save_for_inference(model, tokenizer, output_dir: str) -> None:
    """Save a plain checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads: LoRA merged in."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
