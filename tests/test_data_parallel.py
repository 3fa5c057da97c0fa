"""Data-parallel training under torchrun (gloo, 2 processes on this CPU, loopback only): the same
update as one process, one writer, a killed rank ends the job, and --resume finishes it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # several torchrun jobs

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
BUDGET = ["--model", "tiny", "--backend", "torch", "--num-samples", "256", "--sft-batch-size", "32",
          "--grpo-samples", "16", "--prompts-per-step", "4", "--group-size", "4", "--eval-samples", "16",
          "--ood-samples", "0", "--no-wandb"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, **LOOPBACK, "LOCAL_REASONING_CACHE": str(tmp_path_factory.mktemp("cache"))}


def torchrun(processes: int, *args, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def weights_after_steps(processes: int, variant: str, normaliser: str, folder: Path, env: dict) -> dict:
    output = folder / f"{processes}-{variant}-{normaliser}.npz"
    result = torchrun(processes, ROOT / "tests/helpers/data_parallel_steps.py", output, normaliser, variant, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(output))


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all parameters together."""
    difference = sum(float(((a[k] - b[k]).astype(np.float64) ** 2).sum()) for k in a)
    return (difference / sum(float((a[k].astype(np.float64) ** 2).sum()) for k in a)) ** 0.5


@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_two_processes_give_the_one_process_update(variant, env, tmp_path):
    """3 SFT steps through the real loop and 2 GRPO steps, each process taking half of every batch:
    the weights equal one process's to summation order (measured 1.5e-7)."""
    alone = weights_after_steps(1, variant, "global", tmp_path, env)
    split = weights_after_steps(2, variant, "global", tmp_path, env)
    assert relative_difference(alone, split) < 1e-6


def test_normalising_by_a_process_own_counts_is_caught(env, tmp_path):
    """The same run dividing by each process's own token and sequence counts (measured 5e-4 off)."""
    alone = weights_after_steps(1, "dapo", "global", tmp_path, env)
    wrong = weights_after_steps(2, "dapo", "local", tmp_path, env)
    assert relative_difference(alone, wrong) > 1e-5


def test_torchrun_trains_with_one_writer_and_a_checkpoint_transformers_loads(env, tmp_path):
    result = torchrun(2, "cli.py", "train", *BUDGET, "--output-dir", tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| after GRPO |") == 1  # one process reports
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] in ("sft", "grpo")]
    assert [r["step"] for r in steps if r["phase"] == "sft"] == list(range(1, 9))  # each step once: one writer
    assert all(r["processes"] == 2 for r in steps)
    assert json.loads((tmp_path / "run_config.json").read_text())["processes"] == 2

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "reasoning_final")
    assert model.config.model_type == "qwen2"


def worker_pids(launcher: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def test_a_killed_rank_ends_the_job_and_resume_finishes_it(env, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "cli.py",
               "train", *BUDGET, "--save-every", "2", "--output-dir", str(tmp_path)]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 600
    while not (tmp_path / "checkpoints" / "sft-step-000002").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "no resume point appeared"
        time.sleep(0.2)
    victim = worker_pids(launcher.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.monotonic() - killed_at < 60

    alone = subprocess.run([sys.executable, "cli.py", "train", "--resume", "--output-dir", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines()[-1].startswith("error: this run trained with 2 process(es)")

    resumed = torchrun(2, "cli.py", "train", "--resume", "--output-dir", tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "sft"] == list(range(1, 9))
    assert (tmp_path / "reasoning_final" / "model.safetensors").exists()


def test_mlx_launch_is_refused_in_one_line(env, tmp_path):
    result = subprocess.run([sys.executable, "cli.py", "train", *BUDGET[:2], "--backend", "mlx",
                             "--output-dir", str(tmp_path)], cwd=ROOT, env={**env, "MLX_RANK": "0"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data-parallel MLX (mlx.launch) is not supported yet: run one process, or several with torchrun "
        "and --backend torch"]
