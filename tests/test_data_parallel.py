"""Data-parallel training under torchrun (gloo) and mlx.launch (ring), 2 processes on this CPU,
loopback only: the same update as one process, one writer, a killed rank ends the job, and --resume
finishes it."""
import json
import os
import re
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


def mlx_launch(processes: int, *args, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """mlx.launch's ring backend on 127.0.0.1 (its default host); one process runs plain."""
    launcher = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(processes), "--backend", "ring", "--"]
    command = [*(launcher if processes > 1 else []), sys.executable, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def weights_after_steps(backend: str, processes: int, variant: str, normaliser: str, folder: Path,
                        env: dict) -> dict:
    output = folder / f"{backend}-{processes}-{variant}-{normaliser}.npz"
    args = (ROOT / "tests/helpers/data_parallel_steps.py", output, normaliser, variant, backend)
    result = torchrun(processes, *args, env=env) if backend == "torch" else mlx_launch(processes, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(output))


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all parameters together."""
    difference = sum(float(((a[k] - b[k]).astype(np.float64) ** 2).sum()) for k in a)
    return (difference / sum(float((a[k].astype(np.float64) ** 2).sum()) for k in a)) ** 0.5


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_two_processes_give_the_one_process_update(backend, variant, env, tmp_path):
    """3 SFT steps through the real loop and 2 GRPO steps, each process taking half of every batch:
    the weights equal one process's to summation order."""
    alone = weights_after_steps(backend, 1, variant, "global", tmp_path, env)
    split = weights_after_steps(backend, 2, variant, "global", tmp_path, env)
    assert relative_difference(alone, split) < 1e-6


def test_normalising_by_a_process_own_counts_is_caught(env, tmp_path):
    """The same run dividing by each process's own token and sequence counts (measured 5e-4 off)."""
    alone = weights_after_steps("torch", 1, "dapo", "global", tmp_path, env)
    wrong = weights_after_steps("torch", 2, "dapo", "local", tmp_path, env)
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


def test_processes_leave_the_group_and_exit_cleanly(env):
    """After a run each process leaves the process group. Left to the interpreter's exit, a gloo rank can
    abort ('terminate called without an active exception'): 5 of 8 runs of this script with 'open' did."""
    results = [torchrun(2, ROOT / "tests/helpers/process_group_exit.py", "close", env=env, timeout=120)
               for _ in range(5)]
    assert all(r.returncode == 0 and "terminate called" not in r.stderr for r in results), \
        [r.stderr[-500:] for r in results if r.returncode]


def worker_pids(output: Path) -> list[int]:
    """The training processes (not the launcher, not a shell around them) writing to `output`."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in listing
            if "cli.py train" in line and str(output) in line and "distributed.run" not in line
            and "mlx.launch" not in line and line.split()[1].endswith(("python", "python3"))]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_killed_rank_ends_the_job_and_resume_finishes_it(backend, env, tmp_path):
    budget = [a if a != "torch" else backend for a in BUDGET]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
              if backend == "torch" else
              [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring", "--", sys.executable])
    command = [*launch, "cli.py", "train", *budget, "--save-every", "2", "--output-dir", str(tmp_path)]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 600
    while not (tmp_path / "checkpoints" / "sft-step-000002").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "no resume point appeared"
        time.sleep(0.2)
    victim = worker_pids(tmp_path)[-1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    _, errors = launcher.communicate(timeout=120)
    assert time.monotonic() - killed_at < 60 and not (tmp_path / "reasoning_final").exists()
    if backend == "torch":
        assert launcher.returncode != 0
    else:  # mlx.launch stops the other ranks and says so, but exits 0 whatever its ranks did
        assert "exited with code -9" in errors

    alone = subprocess.run([sys.executable, "cli.py", "train", "--resume", "--output-dir", str(tmp_path)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines()[-1].startswith("error: this run trained with 2 process(es)")

    relaunch = torchrun if backend == "torch" else mlx_launch
    resumed = relaunch(2, "cli.py", "train", "--resume", "--output-dir", tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "sft"] == list(range(1, 9))
    assert (tmp_path / "reasoning_final" / "model.safetensors").exists()


def test_mlx_launch_trains_with_one_writer_and_a_checkpoint_mlx_lm_loads(env, tmp_path):
    """No --backend: under mlx.launch, auto means MLX."""
    budget = [a for a in BUDGET if a not in ("--backend", "torch")]
    command = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--", sys.executable, "cli.py", "train",
               *budget, "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert (config["backend"], config["processes"]) == ("mlx", 2)
    assert result.stdout.count("| after GRPO |") == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] in ("sft", "grpo")]
    assert [r["step"] for r in steps if r["phase"] == "sft"] == list(range(1, 9))
    assert all(r["processes"] == 2 for r in steps)
    loaded = subprocess.run([sys.executable, "-c", "import sys; from mlx_lm import load; "
                             "model, tokenizer = load(sys.argv[1]); print(type(model).__module__)",
                             str(tmp_path / "reasoning_final")], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "qwen2" in loaded.stdout, loaded.stderr[-2000:]


def test_a_launcher_and_the_other_backend_are_one_line(env, tmp_path):
    result = torchrun(2, "cli.py", "train", *BUDGET[:2], "--backend", "mlx", "--output-dir", tmp_path, env=env)
    assert result.returncode != 0
    # whichever rank gets there first says it; torchrun may stop the other before it does
    assert re.search(r"error: rank [01]: this process was started by torchrun \(or accelerate launch\), which runs "
                     r"the torch backend: use --backend torch", result.stderr), result.stderr[-2000:]
