"""Run under torchrun or mlx.launch (1 or 2 processes): SFT steps through the real loop, then GRPO
steps on fixed rollouts split by group, as the driver splits them; rank 0 saves the weights to argv[1].

argv: OUTPUT.npz {global|local} LOSS_VARIANT {torch|mlx}. 'local' makes every process normalise by
its own counts instead of the step's (the mistake the equivalence test must catch).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import shared.training.loops as training  # noqa: E402
from backends import make_backend  # noqa: E402
from shared.algorithms.padding import pack_batch  # noqa: E402
from shared.models.prompts import encode_prompts, encode_targets  # noqa: E402
from shared.models.tiny_model import ensure_tiny_model  # noqa: E402
from shared.runtime.distributed import shard  # noqa: E402
from shared.tasks.addition.data import generate_problems  # noqa: E402
from shared.training.backend import GRPOBatch  # noqa: E402
from shared.training.config import GRPOConfig, ModelConfig, SFTConfig  # noqa: E402

output, normaliser, variant, backend_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if normaliser == "local":
    training.summed = lambda backend, *values: list(values)

backend = make_backend(backend_name, micro_batch_size=3)
backend.load(ensure_tiny_model(), ModelConfig(name="tiny", finetune="full"), trainable=True)
settings = SFTConfig(num_samples=48, batch_size=16, epochs=1, lr=1e-3, warmup_steps=0)
for _ in training.train_sft(backend, generate_problems(48, 3, held_out=False), settings, 3, lambda record: None):
    pass

# GRPO on fixed rollouts: 4 groups of 4, the reference completions cut to different lengths
problems = generate_problems(4, 9, held_out=False)
group = 4
prompts = [p for p in encode_prompts(backend.tokenizer, problems) for _ in range(group)]
targets = [t for t in encode_targets(backend.tokenizer, problems) for _ in range(group)]
completions = [target[: 5 + 7 * (row % group)] for row, target in enumerate(targets)]
advantages = np.random.default_rng(0).normal(size=len(prompts)).astype(np.float32)
config = GRPOConfig(loss_variant=variant, lr=1e-3, max_new_tokens=40)
for _ in range(2):
    rows = [row for index in shard(range(len(problems)), backend.rank, backend.world_size)
            for row in range(index * group, (index + 1) * group)]
    sequences, tokens = training.summed(backend, len(rows), sum(len(completions[r]) for r in rows))
    batch = GRPOBatch(pack_batch([prompts[r] for r in rows], [completions[r] for r in rows],
                                 backend.tokenizer.pad_token_id), advantages[rows], None, None,
                      sampled_sequences=int(sequences), sampled_completion_tokens=int(tokens))
    backend.grpo_step(batch, config.lr, config)

if backend.rank == 0 and backend_name == "torch":
    np.savez(output, **{name: p.detach().numpy() for name, p in backend.model.named_parameters()})
elif backend.rank == 0:
    from mlx.utils import tree_flatten
    np.savez(output, **{name: np.array(value) for name, value in tree_flatten(backend.model.parameters())})
