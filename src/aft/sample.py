"""``aft sample``: k chains of thought per question, batched, de-duplicated, written as it goes, resumable.

Questions are sorted by prompt length and cut into batches sized by tokens (``aft.generation``). Each
sample's noise comes from its own generator, seeded by (seed, prompt, candidate), so no sample depends on
which batch it fell in or what ran before: a run killed half-way and started again writes exactly the file
an uninterrupted run writes. Under ``accelerate launch`` the batches are dealt out across processes (batch
i to process i mod N), each process writes its own shard, and the first merges them. On a GPU with vLLM
installed, ``--backend vllm`` samples with vLLM instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from aft.checks import AftError, check_choice, check_config, require
from aft.data import DataError, read_jsonl, write_jsonl
from aft.generation import (GenerationFields, dtype_name, for_generation, generation_dtype, plan_calls,
                            truncate_at_stop)
from aft.generation import generate as generate_batch
from aft.models import ModelFields, load_model, load_tokenizer
from aft.provenance import OutputFields, claim, note_resolved, resolved
from aft.tasks import TaskFields


@dataclass
class SampleConfig(OutputFields, ModelFields, TaskFields, GenerationFields):
    """Sample k COTs per question of a task split."""

    output: str = field(default="samples.jsonl", metadata={"help": "Groups JSONL to write (resumed if present)."})
    k: int = field(default=8, metadata={"help": "Samples per question (before de-duplication)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion in tokens."})
    batch_size: int = field(default=0, metadata={
        "help": "Most questions per batch (k sequences each); 0: as many as --batch_tokens allows."})
    seed: int = field(default=0, metadata={"help": "Seed; each (question, sample) derives its own noise from it."})
    backend: str = field(default="hf", metadata={"help": "hf (transformers generate) or vllm (if installed)."})
    include_reference: bool = field(default=True, metadata={"help": "Store the reference COT in each group."})

    def __post_init__(self):
        check_config(self)
        check_choice("backend", self.backend, ("hf", "vllm"))
        if self.temperature == 0 and self.k > 1:
            raise AftError("--temperature 0 is greedy decoding: one completion per question, so --k must be 1")


def dedupe(texts: list[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        key = " ".join(t.split())
        if key and key not in seen:
            seen.add(key)
            out.append(t)
    return out


def completions_sampled(path) -> int:
    """Completions drawn into a groups file (before de-duplication, where ``aft sample`` recorded it)."""
    return sum(g.get("n_sampled", len(g["completions"])) for _, g in read_jsonl(path))


def read_done(path: Path) -> dict[str, dict]:
    """Groups already written. A last line cut off by a kill is dropped (and rewritten: ``claim`` has shown
    the file is this stage's own partial output); any other bad line is an error."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
        path.write_text("".join(lines), encoding="utf-8")
    return {obj["id"]: obj for _, obj in read_jsonl(path)}


def _vllm_generate(config: SampleConfig, prompts: list[str]) -> list[list[str]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise RuntimeError("--backend vllm needs vLLM: pip install 'aft[vllm]' on a GPU machine") from None
    llm = LLM(model=config.model, tokenizer=config.tokenizer or config.model, seed=config.seed,
              trust_remote_code=config.trust_remote_code)
    params = SamplingParams(n=config.k, temperature=config.temperature, top_p=config.top_p,
                            max_tokens=config.max_new_tokens, seed=config.seed)
    return [[truncate_at_stop(o.text) for o in r.outputs] for r in llm.generate(prompts, params)]


def sample(config: SampleConfig) -> str:
    """Run the sampling stage; returns the path of the groups file."""
    from accelerate import PartialState

    require(config, "model")
    state = PartialState(cpu=not torch.accelerator.is_available())  # cpu: gloo across CPU processes
    task, examples = config.load_examples()
    ids = [e["id"] for e in examples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{config.task}/{config.split}: duplicate question ids")
    prompts = [task.format_prompt(e) for e in examples]
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)

    def record(i, texts):
        e = examples[i]
        group = {"id": e["id"], "prompt": prompts[i], "completions": dedupe(texts), "n_sampled": len(texts),
                 "answer": e["answer"], "question": e["question"]}
        if "options" in e:  # multiple choice: `aft label` reads an answer given as the option's text
            group["options"] = e["options"]
        if config.include_reference:
            group["reference"] = task.reference_cot(e)
        return group

    output = Path(config.output)
    shards = tuple(output.with_name(f"{output.name}.shard{r}") for r in range(state.num_processes))
    claim("sample", config, also=shards if state.num_processes > 1 else ())  # from here on, output is ours
    state.wait_for_everyone()  # no process writes its shard before the main one has claimed (or refused) them
    if config.backend == "vllm":
        write_jsonl(output, [record(i, t) for i, t in enumerate(_vllm_generate(config, prompts))])
        return str(output)
    # Each process appends to its own shard; with one process the shard is the output itself.
    shard = output if state.num_processes == 1 else output.with_name(f"{output.name}.shard{state.process_index}")
    done = {**read_done(output), **read_done(shard)}
    model = load_model(config.model, config.model_dtype, config.trust_remote_code).to(state.device).eval()
    # a resumed run generates in the dtype its first run resolved `auto` to (perhaps on another machine)
    dtype = generation_dtype((resolved(config, "gen_dtype") if done else None) or config.gen_dtype, state.device)
    if state.num_processes > 1:  # every process generates in rank 0's dtype, whatever its own probe found
        from accelerate.utils import broadcast_object_list

        dtype = broadcast_object_list([dtype])[0]
    note_resolved(config, "gen_dtype", dtype_name(dtype))
    model = for_generation(model, dtype)
    if state.is_main_process:  # what `auto` resolved to: the samples depend on it
        print(f"sample: generating in {dtype_name(dtype)}")
    batches = plan_calls(tokenizer, prompts, config.batch_size, config.k, config.max_new_tokens,
                         config.batch_tokens)
    mine = [(b, batch) for b, batch in enumerate(batches) if b % state.num_processes == state.process_index]
    todo = [(b, batch) for b, batch in mine if any(ids[i] not in done for i in batch)]
    total = sum(len(batch) for _, batch in mine)
    shard.parent.mkdir(parents=True, exist_ok=True)
    with shard.open("a", encoding="utf-8") as f, tqdm(total=total, initial=total - sum(len(t) for _, t in todo),
                                                       desc=f"sample k={config.k}", unit="q",
                                                       disable=not state.is_local_main_process) as bar:
        for b, batch in todo:
            texts = generate_batch(model, tokenizer, [prompts[i] for i in batch], config.k, config.temperature,
                                   config.top_p, config.max_new_tokens, seed=config.seed,
                                   batch_tokens=config.batch_tokens, progress=bar.update)
            lines = [json.dumps(record(i, t), ensure_ascii=False) + "\n" for i, t in zip(batch, texts)
                     if ids[i] not in done]
            f.write("".join(lines))  # one write per call, flushed: a kill loses at most this call
            f.flush()
    state.wait_for_everyone()
    if state.is_main_process:  # canonical order, so resumed, sharded and plain runs give the same file
        merged = dict(done)
        shards = [output] + [output.with_name(f"{output.name}.shard{r}") for r in range(state.num_processes)]
        for path in shards:
            if path.exists():
                merged.update(read_done(path))
        missing = [i for i in ids if i not in merged]
        if missing:
            raise RuntimeError(f"sampling finished with {len(missing)} questions missing, e.g. {missing[:3]}")
        write_jsonl(output, [merged[i] for i in ids])
        for path in shards[1:]:
            path.unlink(missing_ok=True)
    state.wait_for_everyone()
    return str(output)
