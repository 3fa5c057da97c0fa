"""What every benchmark module shares: the data, the models, workers in their own processes, the table.

A module measures one group and runs alone (`python bench/sft.py [--quick] [--json PATH]`); bench/run.py runs
them all. Each measurement is a worker, a function of a bench module run in its own process
(`python bench/MODULE.py --worker NAME --kwargs JSON`, which prints one JSON object): PyTorch and MLX never share
one (the OpenBLAS that MLX needs on Linux would also replace PyTorch's kernels).
"""
from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.training.config import PRESETS  # noqa: E402

SFT_BATCH = 32
GRPO_PROMPTS, GROUP, MAX_NEW = 16, 8, 200
LR = PRESETS["tiny"]["sft"]["lr"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Rows = Iterator[dict]


def problems(count: int, seed: int = 0):
    from shared.tasks.addition.data import generate_problems
    return generate_problems(count, seed=seed, held_out=False)


def tiny_folder() -> Path:
    from shared.models.tiny_model import ensure_tiny_model
    return ensure_tiny_model()


def smollm2_folder() -> str:
    from shared.models.pretrained import ensure_shipped_model
    return str(ensure_shipped_model("smollm2"))


def lora_config():
    """PEFT's LoRA as ours sets it up: r=16, alpha 32, every projection."""
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def conversations(items) -> list[dict]:
    """Prompt-completion pairs in the chat format TRL and mlx-lm read, from the same problems and targets."""
    from shared.tasks.addition.data import reasoning_target
    return [{"prompt": [{"role": "user", "content": p.prompt}],
             "completion": [{"role": "assistant", "content": reasoning_target(p)}]} for p in items]


def after_warmup(durations: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens per second over the steps after the first `warmup` ones."""
    return sum(tokens[warmup:]) / sum(durations[warmup:])


def peak_memory_gb() -> float:
    """The process's peak resident memory (since the last reset_peak_rss), in GiB."""
    from shared.runtime.memory import peak_rss_bytes
    return peak_rss_bytes() / 2**30


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


def run_worker(worker: Callable[..., dict], **kwargs) -> dict:
    """`worker(**kwargs)` in a process of its own, through its module's --worker."""
    command = [sys.executable, inspect.getsourcefile(worker), "--worker", worker.__name__, "--kwargs",
               json.dumps(kwargs)]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"error: {worker.__name__} {kwargs} failed: {result.stderr.strip().splitlines()[-1]}")
    print(f"  {worker.__name__} {kwargs}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(name: str, ours: float | None, peer: float | None, unit: str, goal: float | None,
        lower_is_better: bool) -> dict:
    """One line of the table; `ours` None: the target was never reached."""
    ratio = None if peer is None or ours is None else ours / peer
    return {"name": name, "ours": ours, "peer": peer, "unit": unit, "ratio": ratio, "goal": goal,
            "lower_is_better": lower_is_better}


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


def parsed_or_worker(parser: argparse.ArgumentParser) -> argparse.Namespace | None:
    """The command line; with the hidden --worker NAME, that function of the running module runs here and
    prints its JSON (None returned)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker:
        return args
    print(json.dumps(getattr(sys.modules["__main__"], args.worker)(**json.loads(args.kwargs))))
    return None


def print_rows(measured_rows: Iterable[dict], json_path: Path | None) -> None:
    """The table, each row as soon as it is measured (an interrupted run keeps them); --json rewritten after each."""
    rows = []
    print(markdown([]), flush=True)
    for measured in measured_rows:
        rows.append(measured)
        print(markdown([measured]).splitlines()[-1], flush=True)
        if json_path:
            json_path.write_text(json.dumps(rows, indent=2))


def run_alone(rows: Callable[[bool], Rows], description: str) -> None:
    """A group module's command line: its rows as a table, or one of its workers."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps per measurement")
    parser.add_argument("--json", type=Path, help="also write the rows here, rewritten after each one")
    args = parsed_or_worker(parser)
    if args is not None:
        print_rows(rows(args.quick), args.json)
