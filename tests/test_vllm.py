"""The vLLM backend of ``aft sample`` against transformers ``generate`` on a tiny model: greedy decoding
must give the same completions. Runs only where vLLM is installed (a GPU machine: pip install 'aft[vllm]')."""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (optional GPU extra: pip install 'aft[vllm]')")
if not torch.cuda.is_available():
    pytest.skip("vLLM needs a CUDA GPU", allow_module_level=True)


def test_vllm_backend_matches_hf_greedy(tmp_path, tokenizer):
    from aft.sample import SampleConfig, _vllm_generate, generate_batch
    from aft.tiny import build_model

    model = build_model(tokenizer, size="test", seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = ["Tom has 3 apples and buys 4 more.", "A box holds 12 pens.", "Question: Answer:"]
    config = SampleConfig(model=str(tmp_path / "model"), k=1, temperature=0.0, max_new_tokens=12, seed=0)
    ours = _vllm_generate(config, prompts)
    theirs = generate_batch(model.eval(), tokenizer, prompts, k=1, temperature=0.0, max_new_tokens=12)
    assert ours == theirs


def test_vllm_backend_samples_k_per_question(tmp_path, tokenizer):
    from aft.sample import SampleConfig, _vllm_generate
    from aft.tiny import build_model

    build_model(tokenizer, size="test", seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = SampleConfig(model=str(tmp_path / "model"), k=4, temperature=1.0, max_new_tokens=8, seed=0)
    out = _vllm_generate(config, ["Tom has 3 apples.", "A box"])
    assert [len(x) for x in out] == [4, 4]
