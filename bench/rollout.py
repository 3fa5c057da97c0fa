"""Rollout tokens/s on the tiny model, 128 x 200: ours vs transformers `generate`; ours (MLX) vs mlx_lm
`batch_generate`. Also the sampling workers the other groups use (greedy one at a time, as `infer`).

    python bench/rollout.py [--quick] [--json PATH]      (bench/run.py --only rollout)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project's root

from bench.common import GROUP, GRPO_PROMPTS, MAX_NEW, Rows, peak_memory_gb, problems, row, run_alone, run_worker, tiny_folder  # noqa: E402,E501


def ours_rollout(backend_name: str, rows: int, max_new: int, model: str | None = None) -> dict:
    """Sampling at T=1 from distinct prompts (as evaluation does; GRPO's groups repeat theirs, which we prefill once)."""
    from shared.models.prompts import encode_prompts
    from shared.training.config import ModelConfig
    from backends import make_backend

    backend = make_backend(backend_name)
    backend.load(Path(model) if model else tiny_folder(), ModelConfig(name="tiny", finetune="full"), trainable=False)
    prompts = encode_prompts(backend.tokenizer, problems(rows, seed=2))
    backend.generate(prompts[:2], 4, 1.0, seed=0)  # warm-up
    began = time.perf_counter()
    completions = backend.generate(prompts, max_new, 1.0, seed=0)
    seconds = time.perf_counter() - began
    return {"tokens_per_s": sum(len(c) for c in completions) / seconds, "peak_rss_gb": peak_memory_gb()}


def ours_infer(backend_name: str, model: str, calls: int, max_new: int, speculative: bool) -> dict:
    """Greedy answers to one problem after another, as `infer` gives them: the draft length is learnt
    over the calls, so the first ones pay for trying lengths."""
    from shared.models.prompts import encode_prompts
    from shared.training.config import ModelConfig
    from backends import make_backend

    backend = make_backend(backend_name)
    backend.load(Path(model), ModelConfig(name="bench", finetune="full"), trainable=False)
    if not speculative:
        backend.drafter = None
    prompts = encode_prompts(backend.tokenizer, problems(calls, seed=4))
    backend.generate(prompts[:1], 4, 0.0)  # warm-up
    began, tokens = time.perf_counter(), 0
    for prompt in prompts:
        tokens += len(backend.generate([prompt], max_new, 0.0)[0])
    return {"tokens_per_s": tokens / (time.perf_counter() - began)}


def hf_generate(rows: int, max_new: int, model: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.models.prompts import encode_prompts, stop_token_ids

    folder = model or tiny_folder()
    network = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    prompts = encode_prompts(tokenizer, problems(rows, seed=2))
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    settings = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new,
                    eos_token_id=sorted(stop_token_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        network.generate(**{k: v[:2] for k, v in batch.items()}, **{**settings, "max_new_tokens": 4})
        began = time.perf_counter()
        output = network.generate(**batch, **settings)
        seconds = time.perf_counter() - began
    generated = output[:, batch["input_ids"].shape[1]:]
    return {"tokens_per_s": int((generated != tokenizer.pad_token_id).sum()) / seconds}


def mlx_lm_generate(rows: int, max_new: int, model: str | None = None) -> dict:
    import reasoning_mlx  # noqa: F401  (first: OpenBLAS on Linux)
    from mlx_lm import batch_generate, load
    from mlx_lm.sample_utils import make_sampler

    from shared.models.prompts import encode_prompts

    network, tokenizer = load(str(model or tiny_folder()))
    prompts = encode_prompts(tokenizer._tokenizer, problems(rows, seed=2))
    sampler = make_sampler(temp=1.0)
    batch_generate(network, tokenizer, prompts[:2], max_tokens=4, sampler=sampler)
    began = time.perf_counter()
    response = batch_generate(network, tokenizer, prompts, max_tokens=max_new, sampler=sampler)
    seconds = time.perf_counter() - began
    return {"tokens_per_s": response.stats.generation_tokens / seconds}


def rows(quick: bool) -> Rows:
    rollout = {"rows": GRPO_PROMPTS * GROUP, "max_new": MAX_NEW}
    ours = run_worker(ours_rollout, backend_name="torch", **rollout)
    peer = run_worker(hf_generate, **rollout)
    yield row("rollout tokens/s, tiny, 128 x 200: ours (PyTorch) vs transformers generate",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    ours = run_worker(ours_rollout, backend_name="mlx", **rollout)
    peer = run_worker(mlx_lm_generate, **rollout)
    yield row("rollout tokens/s, tiny, 128 x 200: ours (MLX) vs mlx_lm batch_generate",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)


if __name__ == "__main__":
    run_alone(rows, __doc__)
