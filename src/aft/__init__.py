"""aft: Alignment Fine-Tuning (AFT, arXiv 2309.02144) for LLM reasoners.

The public pieces, importable from the package root (each loads its module on first use, so ``import aft``
and the ``aft`` command stay fast)::

    from aft import AlignConfig, AlignTrainer, alignment_loss, load_task
    trainer = AlignTrainer(model="runs/vft", args=AlignConfig(output_dir="runs/aft"), train_dataset=groups)

Stages (a function and its config each, same names as the ``aft`` subcommands): ``sft`` / ``SFTConfig``,
``sample`` / ``SampleConfig``, ``label`` / ``LabelConfig``, ``align`` / ``AlignConfig``, ``evaluate`` /
``EvalConfig``. Trainers: ``SFTTrainer``, ``AlignTrainer``. Losses (``aft.losses``): ``alignment_loss``,
``rrhf_loss``, ``pro_loss``, ``dpo_loss``, ``nll_loss``. Tasks: ``load_task``.
"""

import importlib

_EXPORTS = {
    "aft.train": ["SFTConfig", "AlignConfig", "SFTTrainer", "AlignTrainer", "sft", "align"],
    "aft.sample": ["SampleConfig", "sample"],
    "aft.label": ["LabelConfig", "label"],
    "aft.evaluate": ["EvalConfig", "evaluate", "assessment_accuracy"],
    "aft.losses": ["alignment_loss", "rrhf_loss", "pro_loss", "dpo_loss", "nll_loss"],
    "aft.scoring": ["completion_logprobs", "sequence_scores"],
    "aft.data": ["load_groups"],
    "aft.tasks": ["load_task"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'aft' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
