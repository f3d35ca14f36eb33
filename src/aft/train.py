"""The two training stages, each a ``transformers.Trainer`` subclass driven by one config dataclass.

- ``aft sft``   vanilla fine-tuning (VFT): token-level NLL of the reference COT given the question.
- ``aft align`` continue from the VFT model on labelled groups with ``L = nll_weight * L_NLL +
  align_weight * L_rank``, where ``L_rank`` is one of the pure losses of ``aft.losses``.

The configs extend ``transformers.TrainingArguments`` (every Trainer option is a flag too: --bf16,
--gradient_checkpointing, --save_steps, ...), and the same dataclasses drive the Python API, the CLI
and YAML configs. Multi-GPU / multi-node runs go through ``accelerate launch`` unchanged.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from aft import losses
from aft.checks import check_choice, check_config, require
from aft.provenance import OutputFields, claim
from aft.data import GroupCollator, SFTCollator, encode_completion, encode_prompt, load_groups, tokenize_group
from aft.models import (ModelFields, load_for_training, load_tokenizer, merge_adapter, save_for_inference,
                        usable_length)
from aft.grouped import micro_batched_backward
from aft.tasks import TaskFields
from aft.scoring import completion_logprobs, is_wrapped, sequence_scores

ALIGN_LOSSES = ("aft", "rft", "rrhf", "pro", "dpo")
NLL_ON = ("reference", "positives", "both", "best", "none")


def _evaluates(config) -> bool:
    """Whether the Trainer evaluates while training (eval_strategy is a string before __post_init__, an enum after)."""
    return str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no"


@dataclass
class StageDefaults(OutputFields, TrainingArguments):
    """Trainer defaults that suit this project (still overridable by flag or YAML)."""

    output_dir: str = field(default="runs/stage", metadata={"help": "Where the trained model is saved."})
    remove_unused_columns: bool = False  # our batches are built by our collators, not from dataset columns
    logging_steps: float = 10
    save_strategy: str = "no"
    save_total_limit: int | None = 2
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    max_length: int = field(default=512, metadata={"help": "Longest prompt + completion in tokens; longer is "
                                                            "skipped and counted."})

    # Held-out evaluation while training (with --eval_strategy steps|epoch): task accuracy by greedy decoding,
    # not the Trainer's default eval loss, since a lower loss need not mean more right answers.
    eval_task: str | None = field(default=None, metadata={
        "help": "Task spec whose questions are evaluated during training (sft: default its own task)."})
    eval_split: str = field(default="validation", metadata={"help": "Split of eval_task evaluated during training."})
    eval_limit: int | None = field(default=200, metadata={"help": "Questions evaluated each time."})
    eval_groups: str | None = field(default=None, metadata={
        "help": "Labelled groups on which assessment accuracy is logged at each evaluation."})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Longest generated answer when evaluating."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after N evaluations without a better held-out accuracy and keep the best model "
                "(sets load_best_model_at_end, metric_for_best_model=accuracy, save_strategy=eval_strategy)."})
    early_stopping_min_epochs: float = field(default=0.0, metadata={
        "help": "With early stopping: evaluations before this many epochs do not count towards the patience "
                "(an early dip of a model still learning does not stop it)."})

    def __post_init__(self):
        check_config(self)
        if self.early_stopping_patience is not None:
            if not _evaluates(self):
                raise ValueError("early_stopping_patience needs eval_strategy 'epoch' or 'steps'")
            self.load_best_model_at_end, self.metric_for_best_model, self.greater_is_better = True, "accuracy", True
            self.save_strategy = self.eval_strategy
            self.save_steps = self.eval_steps or self.save_steps
        # With no GPU, say so: transformers allows bf16 autocast on CPU only with use_cpu (AMX makes it about 2x
        # faster), and only with use_cpu does accelerate set up gloo under `accelerate launch` / torchrun
        # (else every process trains alone on the whole data set).
        if not torch.accelerator.is_available():
            self.use_cpu = True
        super().__post_init__()


@dataclass
class SFTConfig(ModelFields, TaskFields, StageDefaults):
    """Vanilla fine-tuning on (question, reference COT) pairs of a task."""



@dataclass
class AlignConfig(ModelFields, StageDefaults):
    """Alignment on labelled groups: AFT or a baseline, each with or without a constraint."""

    groups: str = field(default="", metadata={"help": "Labelled groups JSONL (see `aft.data`)."})
    loss: str = field(default="aft", metadata={"help": f"One of {', '.join(ALIGN_LOSSES)}. rft is NLL only."})
    constraint: str = field(default="boundary", metadata={"help": "boundary, detach or none."})
    beta: float = field(default=0.5, metadata={
        "help": "Boundary margin of aft, rrhf and pro on length-normalised scores: B = min better score - beta."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO's temperature on the implicit reward margin."})
    dpo_boundary: float = field(default=2.0, metadata={
        "help": "DPO's boundary margin, on the logit dpo_beta * reward: B = min better reward - dpo_boundary / "
                "dpo_beta (see aft.losses.dpo_loss)."})
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the NLL term."})
    align_weight: float = field(default=1.0, metadata={"help": "Weight of the ranking term."})
    nll_on: str = field(default="both", metadata={
        "help": "What the NLL term trains on: reference COT, positives (correct samples), both, best (one "
                "top-labelled positive per group, as RRHF and PRO publish), or none."})
    max_candidates: int | None = field(default=None, metadata={"help": "Keep at most N candidates per group."})
    prefix_sharing: bool | None = field(default=None, metadata={
        "help": "Run each group's prompt once and share its KV cache among the group's completions (same result, "
                "a fifth less time per step on CPU, docs/performance.md; skipped under gradient checkpointing). "
                "Default: on where it can run, i.e. one process on at most one device without DeepSpeed/FSDP; "
                "true forces it (an error where it cannot run), false turns it off."})
    candidate_micro_batch: int | None = field(default=None, metadata={
        "help": "Back-propagate N sequences at a time (exact gradient; one extra graph-free forward), so memory "
                "does not grow with k. Not with DeepSpeed. See aft.grouped."})

    def __post_init__(self):
        super().__post_init__()
        check_choice("loss", self.loss, ALIGN_LOSSES)
        check_choice("constraint", self.constraint, losses.CONSTRAINTS)
        check_choice("nll_on", self.nll_on, NLL_ON)



class MetricsMixin:
    """Accumulates named values per step and adds their means to the Trainer's logs (as TRL does), and counts
    the completion tokens the loss read in training (``finish`` logs the total as ``train_completion_tokens``:
    what a method trained on, so methods can be compared at equal tokens, not only equal steps)."""

    def _count_tokens(self, model, inputs):
        if model.training:
            self.completion_tokens = getattr(self, "completion_tokens", 0) + int(inputs["completion_mask"].sum())

    def _record(self, **values):
        if not hasattr(self, "_metrics"):
            self._metrics = defaultdict(list)
        for k, v in values.items():
            if v is not None:
                self._metrics[k].append(float(v))

    def log(self, logs, start_time=None):
        metrics = getattr(self, "_metrics", {})
        logs = {**logs, **{k: sum(v) / len(v) for k, v in metrics.items() if v}}
        self._metrics = defaultdict(list)
        super().log(logs, start_time)


def held_out_batch_size(per_device_eval_batch_size: int, device) -> int:
    """Most questions per generation batch of the held-out evaluation while training. On an accelerator the
    training state shares its memory, so ``per_device_eval_batch_size`` x 4; on a CPU no cap (0: batches
    sized by KV-cache tokens, as ``aft eval``'s): a CPU decodes many rows a step for little more than a few
    (SmolLM2-135M: 128 questions in one batch in 26 s, against 20 s for each batch of 32)."""
    return 0 if torch.device(device).type == "cpu" else per_device_eval_batch_size * 4


class HeldOutEvalMixin:
    """``evaluate`` measures held-out task accuracy (and assessment accuracy on ``eval_groups``) by generation,
    logs it as ``eval_accuracy`` / ``eval_assessment_accuracy`` and hands it to the callbacks (early stopping,
    best-model selection), as the Trainer's own evaluate does with its loss."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        from aft.evaluate import held_out_metrics

        task, examples, groups = self.held_out
        model = self.accelerator.unwrap_model(self.model)
        found = held_out_metrics(model, self.processing_class, task, examples, groups,
                                 self.args.eval_max_new_tokens, self.args.max_length,
                                 held_out_batch_size(self.args.per_device_eval_batch_size, self.args.device))
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in found.items() if isinstance(v, (int, float))}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class ResumeMixin:
    """Resuming from a checkpoint without the Trainer's two surprises: a warning that tied weights (an
    ``lm_head`` that is the embedding matrix, stored once) are "missing", and a ``train_loss`` averaged over
    the resumed steps only. Here it is the mean over the whole run, from the losses logged before the
    checkpoint (exact when the checkpoint's step is a logging step, as with save_steps a multiple of
    logging_steps; else left as the Trainer computes it)."""

    def _issue_warnings_after_load(self, load_result):
        params = dict(self.model.named_parameters(remove_duplicate=False))
        loaded = {id(p) for name, p in params.items() if name not in load_result.missing_keys}
        tied = {k for k in load_result.missing_keys if k in params and id(params[k]) in loaded}
        if tied and hasattr(load_result, "_replace"):
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        start, end = getattr(self, "_initial_global_step", 0), self.state.global_step
        logged = sorted((h["step"], h["loss"]) for h in self.state.log_history if "loss" in h and h["step"] <= start)
        if not (0 < start < end) or not logged or logged[-1][0] != start:
            return output
        before = sum(loss * (step - prev) for (prev, _), (step, loss) in zip([(0, 0.0)] + logged, logged))
        whole = (before + output.training_loss * (end - start)) / end
        output.metrics["train_loss"] = whole
        for entry in self.state.log_history:
            if "train_loss" in entry:
                entry["train_loss"] = whole
        return output._replace(training_loss=whole)


def held_out(config, default_task: str | None = None):
    """(task, examples, groups) that training evaluates on, or None when evaluation is off."""
    from aft.tasks import load_task

    if not _evaluates(config):
        return None
    spec = config.eval_task or default_task
    if not spec:
        raise ValueError("evaluation during training needs eval_task (a task spec with a held-out split)")
    task = load_task(spec)
    groups = load_groups(config.eval_groups)[0] if config.eval_groups else None
    return task, task.load(config.eval_split, limit=config.eval_limit), groups


class EarlyStopping(EarlyStoppingCallback):
    """The Trainer's early stopping, with evaluations before ``min_epochs`` not counted towards the patience.
    (Keyword names as the parent's: a resumed Trainer rebuilds the callback from ``state()``.)"""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0,
                 min_epochs: float = 0.0):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.min_epochs = min_epochs

    def state(self) -> dict:
        state = super().state()
        state["args"]["min_epochs"] = self.min_epochs
        return state

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        if (state.epoch or 0.0) + 1e-6 < self.min_epochs:
            return
        super().on_evaluate(args, state, control, metrics, **kwargs)


def make_trainer(cls, config, default_task=None, **kwargs):
    """A trainer of ``cls`` with held-out evaluation and early stopping wired in where the config asks."""

    evaluation = held_out(config, default_task)
    callbacks = [EarlyStopping(config.early_stopping_patience, min_epochs=config.early_stopping_min_epochs)] \
        if config.early_stopping_patience else []
    trainer = cls(args=config, eval_dataset=evaluation[1] if evaluation else None, callbacks=callbacks, **kwargs)
    trainer.held_out = evaluation
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        warnings.warn("the accelerate config asks for FSDP, but accelerate runs these processes data-parallel "
                      "(DDP) instead: it shards only on GPUs (CPU processes always get DDP)")
    return trainer


class SFTTrainer(ResumeMixin, HeldOutEvalMixin, MetricsMixin, Trainer):
    """Token-level NLL of the completion, through the same chunked scorer the alignment losses use."""

    loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: the Trainer divides by accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count_tokens(model, inputs)
        sums, counts = completion_logprobs(model, inputs["input_ids"], inputs["attention_mask"],
                                           inputs["completion_mask"])
        loss = losses.nll_loss(sums, counts)
        return (loss, {}) if return_outputs else loss


class AlignTrainer(ResumeMixin, HeldOutEvalMixin, MetricsMixin, Trainer):
    """``compute_loss`` scores every candidate of each group and calls the pure loss of ``args.loss``.

    From Python, as TRL's trainers are used::

        trainer = AlignTrainer(model="runs/vft", args=AlignConfig(output_dir="runs/aft"), train_dataset=groups)
        trainer.train()

    ``model`` is a loaded model, or a hub name or folder (loaded as ``aft align`` does, LoRA included; default
    ``args.model``). ``train_dataset`` is groups (``{"prompt", "completions", "labels"}``), TRL pairs
    (``{"prompt", "chosen", "rejected"}``) or RRHF rows, as a ``datasets.Dataset``, a list of dicts or a JSONL
    path (default ``args.groups``); it is tokenised here, and for DPO the reference log-probs are computed here.
    """

    def __init__(self, model=None, args: AlignConfig = None, train_dataset=None, processing_class=None,
                 data_collator=None, **kwargs):
        if not isinstance(args, AlignConfig):
            raise ValueError("AlignTrainer needs args=AlignConfig(...)")
        if model is None or isinstance(model, str):
            args.model = model or args.model
            set_seed(args.seed)  # before the model exists: LoRA's initial weights are drawn from it
            model, tokenizer = load_for_training(args)
            processing_class = processing_class or tokenizer
        source = train_dataset if train_dataset is not None else (args.groups or None)
        if source is not None and not _tokenized(source):
            if processing_class is None:
                processing_class = load_tokenizer(args.tokenizer or args.model, args.trust_remote_code)
            train_dataset = align_features(args, processing_class, source, usable_length(args.max_length, model))
            if args.loss == "dpo" and any("ref_logps" not in f for f in train_dataset):
                add_reference_logps(model, train_dataset, processing_class.pad_token_id)
        if data_collator is None and processing_class is not None:
            data_collator = GroupCollator(processing_class.pad_token_id, args.nll_on)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=data_collator, **kwargs)

    # Our loss is a per-micro-batch mean. Without this the Trainer, seeing a "labels" key and a model whose
    # forward takes **kwargs, assumes the loss was normalised by num_items_in_batch and skips dividing by
    # the accumulation steps, so gradient_accumulation_steps=2 would double the gradient.
    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: AlignConfig = self.args
        self._count_tokens(model, inputs)
        sharing = self._prefix_sharing(model)
        groups = inputs["group_index"] if sharing else None
        if args.candidate_micro_batch and model.training and torch.is_grad_enabled():
            # The backward happens here, micro-batch by micro-batch (aft.grouped); the Trainer's own backward
            # then runs on a detached leaf and adds nothing. Scaled as training_step scales the loss.
            loss, scores, nll, rank = micro_batched_backward(
                model, inputs, lambda sums, counts: self.objective(sums, counts, inputs), args.candidate_micro_batch,
                scale=1.0 / getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps), backward=self.accelerator.backward,
                no_sync=lambda: self.accelerator.no_sync(model), prefix_sharing=sharing,
                autocast=self.accelerator.autocast)
            loss = loss.requires_grad_()
        else:
            # Prefix sharing calls the decoder stack past the model's forward, which is where accelerate put
            # its mixed-precision autocast; entering it here gives the shared path the same precision.
            with self.accelerator.autocast():
                sums, counts = completion_logprobs(model, inputs["input_ids"], inputs["attention_mask"],
                                                   inputs["completion_mask"], group_index=groups)
            loss, scores, nll, rank = self.objective(sums, counts, inputs)
        self._record_batch(scores.detach(), inputs["labels"], inputs["candidate_mask"], nll, rank)
        return (loss, {}) if return_outputs else loss

    def _prefix_sharing(self, model) -> bool:
        """``args.prefix_sharing``, or where unset, whether no wrapper (DDP, DataParallel, DeepSpeed, FSDP)
        stands between the trainer and the model: the shared path calls the decoder stack past its forward."""
        if self.args.prefix_sharing is not None:
            return self.args.prefix_sharing
        return not (is_wrapped(model) or self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def objective(self, sums, counts, inputs):
        """``L = nll_weight * L_NLL + align_weight * L_rank`` from the per-sequence log-prob sums."""
        args: AlignConfig = self.args
        nll = losses.nll_loss(sums, counts, inputs["nll_weight"])
        is_cand = inputs["candidate_index"] >= 0
        g, k = inputs["group_index"][is_cand], inputs["candidate_index"][is_cand]
        labels = inputs["labels"]
        # Fold the flat per-sequence values back into the (groups x candidates) layout of the losses.
        scores = sums.new_zeros(labels.shape).index_put((g, k), sequence_scores(sums, counts)[is_cand])
        rank = self.rank_loss(scores, sums.new_zeros(labels.shape).index_put((g, k), sums[is_cand]), inputs)
        loss = args.nll_weight * nll + (args.align_weight * rank if rank is not None else 0.0)
        return loss, scores, nll, rank

    def rank_loss(self, scores, summed, inputs):
        a: AlignConfig = self.args
        labels, mask = inputs["labels"], inputs["candidate_mask"]
        if a.loss == "aft":
            return losses.alignment_loss(scores, labels, mask, constraint=a.constraint, beta=a.beta)
        if a.loss == "rrhf":
            return losses.rrhf_loss(scores, labels, mask, constraint=a.constraint, beta=a.beta)
        if a.loss == "pro":
            return losses.pro_loss(scores, labels, mask, constraint=a.constraint, beta=a.beta)
        if a.loss == "dpo":  # DPO's implicit reward uses summed log-probs against the frozen start model's
            return losses.dpo_loss(summed, labels, inputs["ref_logps"], mask, dpo_beta=a.dpo_beta,
                                   constraint=a.constraint, dpo_boundary=a.dpo_boundary)
        return None  # rft: NLL only

    def _record_batch(self, scores, labels, mask, nll, rank):
        pairs = losses.pair_mask(labels, mask)
        top = labels.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        low = labels.masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True)
        pos, neg = mask & (labels == top) & (top > low), mask & (labels < top)
        ordered = (scores.unsqueeze(2) > scores.unsqueeze(1)) & pairs
        self._record(
            nll=nll.item(), rank_loss=None if rank is None else rank.item(),
            score_positive=scores[pos].mean().item() if pos.any() else None,
            score_negative=scores[neg].mean().item() if neg.any() else None,
            pair_accuracy=(ordered.sum() / pairs.sum()).item() if pairs.any() else None,
        )


# ---- the stage functions ------------------------------------------------------------------------------

def _report(title, counts: Counter):
    if counts:
        print(f"{title}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def sft(config: SFTConfig) -> str:
    """Vanilla fine-tuning. Returns the folder of the saved model."""
    require(config, "model")
    claim("sft", config, write=False)  # refused before the model loads
    task, examples = config.load_examples()
    set_seed(config.seed)  # before the model exists: LoRA's initial weights are drawn from it
    model, tokenizer = load_for_training(config)
    max_length = usable_length(config.max_length, model)
    features, skipped = [], Counter()
    for example in examples:
        prompt = encode_prompt(tokenizer, task.format_prompt(example))
        completion = encode_completion(tokenizer, task.reference_cot(example))
        if len(prompt) + len(completion) > max_length:
            skipped["skipped: longer than max_length"] += 1
            continue
        features.append({"prompt_ids": prompt, "completion_ids": completion})
    _report(f"sft data ({len(features)} examples)", skipped)
    if not features:
        raise ValueError(f"no training example fits max_length={max_length}")
    claim("sft", config)
    trainer = make_trainer(SFTTrainer, config, config.task, model=model, train_dataset=features,
                           data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=_last_checkpoint(config))
    finish(trainer, tokenizer, config)
    return config.output_dir


def _tokenized(dataset) -> bool:
    """Whether ``dataset`` already holds the features ``align_features`` makes (a list of dicts with token ids)."""
    return isinstance(dataset, list) and bool(dataset) and "prompt_ids" in dataset[0]


def align_features(config: AlignConfig, tokenizer, groups=None, max_length: int | None = None, loaded=None):
    """Token ids of ``groups`` (rows or a path, see ``load_groups``; default ``config.groups``), or of
    ``loaded``, what ``load_groups`` returned for them."""
    source = config.groups if groups is None else groups
    groups, report = loaded or load_groups(source)
    name = source if isinstance(source, (str, os.PathLike)) else "train_dataset"
    features = []
    for group in groups:
        if config.max_candidates is not None:
            group = {**group, **{key: group[key][:config.max_candidates]
                                 for key in ("completions", "labels", "correct", "ref_logps") if key in group}}
        f = tokenize_group(tokenizer, group, max_length or config.max_length, report, config.nll_on)
        if f["completion_ids"] or "reference_ids" in f:
            features.append(f)
        else:
            report["skipped: group with nothing to train on"] += 1
    _report(f"align data ({len(features)} groups)", report)
    if not features:
        raise ValueError(f"{name}: no usable group")
    if config.loss != "rft" and not any(len(set(f["labels"])) > 1 for f in features):
        print(f"warning: {name}: no group has a better and a worse completion, so the {config.loss} "
              "ranking term is zero and this run trains the NLL term only", file=sys.stderr)
    return features


@torch.no_grad()
def add_reference_logps(model, features, pad_id: int, batch_size: int = 16):
    """DPO's frozen reference: summed log-probs of every candidate under the starting model, computed
    once before training so no second model is held in memory."""
    model.eval()
    for f in features:
        logps = []
        for start in range(0, len(f["completion_ids"]), batch_size):
            chunk = f["completion_ids"][start:start + batch_size]
            batch = SFTCollator(pad_id)([{"prompt_ids": f["prompt_ids"], "completion_ids": c} for c in chunk])
            logps += completion_logprobs(model, **batch)[0].tolist()
        f["ref_logps"] = logps
    model.train()


def align(config: AlignConfig, train_dataset=None) -> str:
    """Alignment stage (AFT or a baseline) on ``train_dataset`` (rows in memory, see ``AlignTrainer``) or
    ``config.groups``. Returns the folder of the saved model."""
    require(config, "model", *(["groups"] if train_dataset is None else []))
    claim("align", config, write=False)  # refused before the model loads
    source = config.groups if train_dataset is None else train_dataset
    loaded = load_groups(source)  # a bad line stops here, before the model loads
    set_seed(config.seed)  # before the model exists: LoRA's initial weights are drawn from it
    model, tokenizer = load_for_training(config)
    features = align_features(config, tokenizer, source, usable_length(config.max_length, model), loaded)
    claim("align", config)
    if config.loss == "dpo" and any("ref_logps" not in f for f in features):
        add_reference_logps(model, features, tokenizer.pad_token_id)
    trainer = make_trainer(AlignTrainer, config, model=model, train_dataset=features, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=_last_checkpoint(config))
    finish(trainer, trainer.processing_class, config)
    return config.output_dir


def finish(trainer, tokenizer, config):
    """Save the model for inference (once, by the main process), and the logged history that `aft report`
    plots. Under DeepSpeed or FSDP the trainer gathers the sharded weights first (ZeRO-3 needs
    ``stage3_gather_16bit_weights_on_model_save``, FSDP a FULL_STATE_DICT, as the shipped configs set)."""
    import os

    trainer.accelerator.wait_for_everyone()
    main = trainer.is_world_process_zero()
    if trainer.is_fsdp_enabled and config.lora_r == 0:
        # The Trainer's own FSDP2 save hangs (transformers 5.24, accelerate 1.15: the state dict it saves still
        # holds sharded DTensors, which rank 0 alone then reads, a collective the other ranks never join). So every
        # rank gathers each weight in turn, rank 0 keeps the full copies and writes them (safetensors, split past
        # 5 GB) with the model's config and the tokenizer.
        from huggingface_hub import save_torch_state_dict
        from torch.distributed.tensor import DTensor

        state = {}
        for name, value in trainer.model.state_dict().items():
            value = value.full_tensor() if isinstance(value, DTensor) else value
            if main:
                state[name] = value.detach().cpu().clone()
        if main:
            save_torch_state_dict(state, config.output_dir, metadata={"format": "pt"})
            trainer.accelerator.unwrap_model(trainer.model).config.save_pretrained(config.output_dir)
            tokenizer.save_pretrained(config.output_dir)
    elif trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        lora = config.lora_r > 0
        trainer.save_model(os.path.join(config.output_dir, "adapter") if lora else config.output_dir)
        if main and lora:  # only the adapter comes back gathered: merge it into a fresh copy of the base
            merge_adapter(config.model, os.path.join(config.output_dir, "adapter"), config.output_dir, tokenizer,
                          config.model_dtype, config.trust_remote_code)
        elif main:
            tokenizer.save_pretrained(config.output_dir)
    elif main:
        save_for_inference(trainer.model, tokenizer, config.output_dir)
    tokens = trainer.accelerator.reduce(torch.tensor(getattr(trainer, "completion_tokens", 0)), "sum")
    trainer.log({"train_completion_tokens": int(tokens)})
    if main:
        trainer.state.save_to_json(os.path.join(config.output_dir, "trainer_state.json"))
    trainer.accelerator.wait_for_everyone()


def checkpoint_problem(folder) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from, or None. The Trainer writes the weights, then the
    optimizer, scheduler and random states, and ``trainer_state.json`` last: a kill during the save leaves
    it without that file, with that file cut short, or with a weights file shorter than its header says."""
    import json
    from pathlib import Path

    from aft.checks import check_safetensors

    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (a save cut short)"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json cut short"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no .safetensors weights"
    for path in weights:
        problem = check_safetensors(path)
        if problem:
            return f"{path.name} is damaged ({problem})"
    return None


def _last_checkpoint(config: TrainingArguments):
    """Continue from the newest complete checkpoint in output_dir, if a killed run left one; say which
    newer ones are skipped, and why."""
    import re
    from pathlib import Path

    folder = Path(config.output_dir)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)] \
        if folder.is_dir() else []
    for path in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        print(f"resume: skipping {path}: {problem}", file=sys.stderr)
    return None
