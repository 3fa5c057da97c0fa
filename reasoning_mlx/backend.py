"""The MLX backend: mlx + mlx-lm behind shared.backend.Backend."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from shared.backend import GRPOBatch
from shared.config import GRPOConfig, ModelConfig, SFTConfig
from shared.grpo import policy_drift
from shared.padding import TokenBatch
from shared.prompts import stop_token_ids
from reasoning_mlx.batching import right_padded, roll_rows
from reasoning_mlx.distributed import all_sum, join_group, sum_gradients
from reasoning_mlx.generate import generate
from reasoning_mlx.losses import grpo_loss, token_logprobs
from reasoning_mlx.model import LoadedModel, load_model, save_model, set_lora_scale
from reasoning_mlx.optimizer import load_optimizer_state, make_optimizer, save_optimizer_state, write_optimizer_file


class MLXBackend:
    name = "mlx"

    def __init__(self, micro_batch_size: int = 64):
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = join_group()
        self.loaded: LoadedModel | None = None
        self.model = self.tokenizer = self.optimizer = self.reference_weights = None
        self.saved_optimizer_state: dict[str, mx.array] = {}

    def load(self, model_path: Path, model: ModelConfig, trainable: bool = True) -> None:
        self.loaded = load_model(model_path, model, trainable)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.optimizer = None
        self.reference_weights = None if self.loaded.lora else self.model.trainable_parameters()
        self.saved_optimizer_state = load_optimizer_state(Path(model_path)) if trainable else {}

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return np.array(values, dtype=np.float64)
        return all_sum(values)

    def close(self) -> None:
        """mx.distributed has no call to leave a group (init, the collectives, nothing to close)."""

    def set_reference(self, folder: Path | None = None) -> None:
        if self.loaded.lora:
            return
        self.reference_weights = (self.model.trainable_parameters() if folder is None else
                                  load_model(folder, ModelConfig(finetune="full"), trainable=False).model.parameters())

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int | None = None) -> list[list[int]]:
        return generate(self.model, prompts, max_new_tokens, temperature, stop_token_ids(self.tokenizer),
                        self.tokenizer.pad_token_id, seed)

    def completion_logprobs(self, batch: TokenBatch, temperature: float = 1.0,
                            reference: bool = False) -> np.ndarray:
        shifts, ids, mask = right_padded(batch)
        chunks = []
        with self.reference_policy() if reference else nullcontext():
            for rows in self.row_slices(len(batch)):
                logprobs = token_logprobs(self.model, mx.array(ids[rows]), temperature) * mx.array(mask[rows])
                chunks.append(np.array(logprobs))
        return roll_rows(np.concatenate(chunks), -shifts)

    @contextmanager
    def reference_policy(self):
        """The starting policy for the KL term: LoRA scaled to 0, or the starting full weights."""
        if self.loaded.lora:
            previous = set_lora_scale(self.model, 0.0)
            try:
                yield
            finally:
                set_lora_scale(self.model, previous)
            return
        current = self.model.trainable_parameters()
        self.model.update(self.reference_weights)
        try:
            yield
        finally:
            self.model.update(current)

    def row_slices(self, count: int):
        """One slice of rows per micro-batch."""
        for start in range(0, count, self.micro_batch_size):
            yield slice(start, start + self.micro_batch_size)

    def accumulate(self, loss_fn, inputs) -> tuple[float, dict, list[np.ndarray]]:
        """Summed loss and gradients over micro-batches, each evaluated before the next (bounded memory).

        `loss_fn` returns (loss, per-token log-probs); the log-probs come back as numpy for statistics.
        """
        value_and_grad = nn.value_and_grad(self.model, loss_fn)
        total, gradients, logprobs = 0.0, None, []
        for part in inputs:
            (loss, part_logprobs), grads = value_and_grad(*part)
            gradients = grads if gradients is None else tree_map(mx.add, gradients, grads)
            mx.eval(loss, gradients, part_logprobs)
            total += loss.item()
            logprobs.append(np.array(part_logprobs))
        return total, gradients, logprobs

    def apply_gradients(self, gradients: dict, lr: float, settings: SFTConfig | GRPOConfig) -> float:
        """Clip `gradients`, step AdamW with them; returns the norm before clipping."""
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, lr, settings.weight_decay, self.saved_optimizer_state)
        self.optimizer.learning_rate = lr
        self.optimizer.weight_decay = settings.weight_decay
        if self.world_size > 1:
            gradients = sum_gradients(gradients)
        gradients, grad_norm = optim.clip_grad_norm(gradients, settings.max_grad_norm)
        self.optimizer.update(self.model, gradients)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return grad_norm.item()

    def weights_are_finite(self) -> bool:
        return all(mx.isfinite(value).all().item() for _, value in tree_flatten(self.model.trainable_parameters()))

    def sft_step(self, batch: TokenBatch, lr: float, settings: SFTConfig, total_tokens: int | None = None) -> dict:
        _, ids, mask = right_padded(batch)
        total_tokens = total_tokens or int(mask.sum())

        def loss_fn(ids_part, mask_part):
            logprobs = token_logprobs(self.model, ids_part) * mask_part
            return -logprobs.sum() / total_tokens, logprobs

        inputs = ((mx.array(ids[rows]), mx.array(mask[rows])) for rows in self.row_slices(len(batch)))
        loss, gradients, _ = self.accumulate(loss_fn, inputs)
        return {"loss": loss, "grad_norm": self.apply_gradients(gradients, lr, settings)}

    def grpo_step(self, batch: GRPOBatch, lr: float, settings: GRPOConfig) -> dict:
        if batch.tokens is None:  # a data-parallel process whose groups have no signal: its zero gradient
            zeros = tree_map(mx.zeros_like, self.model.trainable_parameters())
            return {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0,
                    "grad_norm": self.apply_gradients(zeros, lr, settings)}
        tokens = batch.tokens
        shifts, ids, mask = right_padded(tokens)
        old, ref = (None if a is None else roll_rows(a, shifts).astype(np.float32)
                    for a in (batch.old_logprobs, batch.ref_logprobs))
        totals = batch.loss_totals(settings.max_new_tokens)

        def loss_fn(ids_part, mask_part, old_part, ref_part, advantages_part):
            new = token_logprobs(self.model, ids_part, settings.temperature) * mask_part
            old_part = mx.stop_gradient(new) if old_part is None else old_part
            return grpo_loss(new, old_part, advantages_part, mask_part, settings, ref_part, **totals), new

        def part(array, rows):
            return None if array is None else mx.array(array[rows])

        inputs = ((mx.array(ids[rows]), mx.array(mask[rows]), part(old, rows), part(ref, rows),
                   mx.array(batch.advantages[rows], dtype=mx.float32)) for rows in self.row_slices(len(tokens)))
        loss, gradients, new = self.accumulate(loss_fn, inputs)
        stats = {"loss": loss, **policy_drift(np.concatenate(new), old, ref, mask, settings.epsilon)}
        stats["grad_norm"] = self.apply_gradients(gradients, lr, settings)
        return stats

    def save(self, folder: Path) -> None:
        save_model(self.loaded, folder)
        if self.optimizer is not None:
            save_optimizer_state(self.optimizer, folder)
        elif self.saved_optimizer_state:  # loaded and not stepped since (GRPO steps without signal): passed on
            write_optimizer_file(self.saved_optimizer_state, folder)
