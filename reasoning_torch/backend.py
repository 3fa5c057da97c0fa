"""The PyTorch backend: transformers + peft behind shared.training.backend.Backend."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

from shared.algorithms.drafts import NgramDrafter
from shared.algorithms.grpo import policy_drift
from shared.algorithms.padding import TokenBatch, prefix_blocks, rows_per_pass
from shared.models.prompts import stop_token_ids
from shared.runtime.memory import available_bytes, peak_rss_bytes, reset_peak_rss
from shared.training.backend import GRPOBatch
from shared.training.config import GRPOConfig, ModelConfig, SFTConfig
from reasoning_torch.batching import micro_batches
from reasoning_torch.distributed import (all_sum, join_process_group, leave_process_group, process_device,
                                         sum_gradients)
from reasoning_torch.generate import generate
from reasoning_torch.losses import grpo_loss, prefix_logprobs, sft_loss, to_tensors, token_logprobs
from reasoning_torch.model import load_model, pick_device, save_model
from reasoning_torch.optimizer import load_optimizer_state, make_optimizer, save_optimizer_state, write_optimizer_file


class TorchBackend:
    name = "torch"

    def __init__(self, micro_batch_size: int = 64, device: str | None = None, shared_prefix: bool = True,
                 speculative: bool = True):
        self.rank, self.world_size = join_process_group()
        self.device = torch.device(device) if device else process_device() or pick_device()
        self.micro_batch_size = micro_batch_size
        self.shared_prefix = shared_prefix  # False: every row carries its prompt (the reference the tests compare to)
        self.drafter = NgramDrafter() if speculative else None  # remembers completions across calls
        self.generation_stats: dict = {}
        self.model = self.tokenizer = self.optimizer = self.reference = None
        self.recomputes = False  # gradient checkpointing
        self.saved_optimizer_state: dict[str, torch.Tensor] = {}

    def load(self, model_path: Path, model: ModelConfig, trainable: bool = True) -> None:
        self.model, self.tokenizer = load_model(model_path, model, self.device, trainable)
        # transformers drops the KV cache of a layer it recomputes: the shared-prefix pass cannot run then
        self.recomputes = trainable and model.gradient_checkpointing
        self.optimizer = self.reference = None
        self.saved_optimizer_state = load_optimizer_state(Path(model_path)) if trainable else {}

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def close(self) -> None:
        if self.world_size > 1:
            leave_process_group()

    def set_reference(self, folder: Path | None = None) -> None:
        if hasattr(self.model, "disable_adapter"):
            return
        if folder is None:
            self.reference = copy.deepcopy(self.model)
        else:
            self.reference, _ = load_model(folder, ModelConfig(finetune="full"), self.device, trainable=False)
        self.reference.eval().requires_grad_(False)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return np.array(values, dtype=np.float64)
        return all_sum(values, self.device)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int | None = None) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            rows = generate(self.model, prompts, max_new_tokens, temperature, stop_token_ids(self.tokenizer),
                            self.tokenizer.pad_token_id, seed, drafter=self.drafter,
                            stats=self.generation_stats)
        self.model.train(was_training)
        return rows

    @torch.no_grad()
    def completion_logprobs(self, batch: TokenBatch, temperature: float = 1.0,
                            reference: bool = False) -> np.ndarray:
        logprobs = np.zeros(batch.input_ids.shape, dtype=np.float32)
        with self.reference_policy() if reference else contextlib.nullcontext(self.model) as model:
            for rows, columns, part_logprobs in self.logprob_parts(model, batch, temperature):
                logprobs[rows, columns] = part_logprobs.float().cpu().numpy()
        logprobs[batch.completion_mask == 0] = 0.0  # the prefix pass also scores the pads after a completion
        return logprobs

    def logprob_parts(self, model, batch: TokenBatch, temperature: float):
        """(rows, columns, their per-token log-probs) for each micro-batch: each distinct prompt run once
        (shared_prefix), or each row with its own copy of its prompt."""
        if self.prefix_once:
            for block in prefix_blocks(batch, self.rows_per_pass(batch)):
                with self.autocast():
                    logprobs = prefix_logprobs(model, block, self.device, temperature)
                yield block.rows, block.columns, logprobs
            return
        for rows, columns, part in self.parts(batch):
            with self.autocast():
                logprobs = token_logprobs(model, to_tensors(part, self.device), temperature)
            yield rows, columns, logprobs

    @contextlib.contextmanager
    def reference_policy(self):
        """The starting policy for the KL term: the model with its LoRA adapters off, or a frozen copy of full
        weights."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
            return
        if self.reference is None:
            self.set_reference()
        yield self.reference

    @property
    def prefix_once(self) -> bool:
        return self.shared_prefix and not self.recomputes

    def rows_per_pass(self, batch: TokenBatch) -> int:
        return self.sequences_per_pass(batch.input_ids.shape[1], self.model.config.vocab_size)

    def sequences_per_pass(self, columns: int, vocab_size: int) -> int:
        return rows_per_pass(self.micro_batch_size, columns, vocab_size)

    def available_memory(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else available_bytes()

    def parts(self, batch: TokenBatch):
        """(rows, columns, that part of the batch) for each micro-batch (rows of similar length)."""
        for rows, columns in micro_batches(batch.attention_mask, self.rows_per_pass(batch)):
            yield rows, columns, batch.part(rows, columns)

    def optimizer_step(self, lr: float, settings: SFTConfig | GRPOConfig) -> float:
        """Clip the accumulated gradients, step AdamW and clear them; returns the norm before clipping."""
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, lr, settings.weight_decay, self.saved_optimizer_state)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.world_size > 1:
            sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def weights_are_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad)

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss_bytes()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def sft_step(self, batch: TokenBatch, lr: float, settings: SFTConfig, total_tokens: int | None = None) -> dict:
        total_tokens = total_tokens or int(batch.completion_mask.sum())
        loss = 0.0
        for _, _, part in self.parts(batch):
            with self.autocast():
                part_loss = sft_loss(self.model, to_tensors(part, self.device), total_tokens)
            part_loss.backward()
            loss += float(part_loss.detach())
        return {"loss": loss, "grad_norm": self.optimizer_step(lr, settings)}

    def grpo_step(self, batch: GRPOBatch, lr: float, settings: GRPOConfig) -> dict:
        if batch.tokens is None:  # a data-parallel process whose groups have no signal: its zero gradient
            return {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "grad_norm": self.optimizer_step(lr, settings)}
        tokens, totals = batch.tokens, batch.loss_totals(settings.max_new_tokens)
        loss, new_logprobs = 0.0, np.zeros(tokens.input_ids.shape, dtype=np.float32)
        for rows, columns, new in self.logprob_parts(self.model, tokens, settings.temperature):

            def given(array: np.ndarray | None) -> torch.Tensor | None:
                return None if array is None else torch.from_numpy(array[rows][:, columns]).to(new)

            mask = given(tokens.completion_mask)
            new = new * mask
            old = new.detach() if batch.old_logprobs is None else given(batch.old_logprobs)
            advantages = torch.from_numpy(batch.advantages[rows]).to(new)
            part_loss = grpo_loss(new, old, advantages, mask, settings, given(batch.ref_logprobs), **totals)
            part_loss.backward()
            loss += float(part_loss.detach())
            new_logprobs[rows, columns] = new.detach().float().cpu().numpy()
        stats = {"loss": loss, **policy_drift(new_logprobs, batch.old_logprobs, batch.ref_logprobs,
                                              tokens.completion_mask, settings.epsilon)}
        stats["grad_norm"] = self.optimizer_step(lr, settings)
        return stats

    def save(self, folder: Path) -> None:
        save_model(self.model, self.tokenizer, folder)
        if self.optimizer is not None:
            save_optimizer_state(self.model, self.optimizer, folder)
        elif self.saved_optimizer_state:  # loaded and not stepped since (GRPO steps without signal): passed on
            write_optimizer_file(self.saved_optimizer_state, folder)

