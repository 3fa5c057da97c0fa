"""bench/: each group module runs alone, and a worker runs in a process of its own through its module."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import GROUPS  # noqa: E402


@pytest.mark.parametrize("module", sorted(set(GROUPS.values())))
def test_each_group_module_runs_alone(module):
    result = subprocess.run([sys.executable, f"bench/{module}.py", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "--json" in result.stdout, result.stderr


def test_a_worker_runs_in_its_own_process_through_its_module(tiny_model_dir):
    from bench.common import run_worker
    from bench.rollout import ours_rollout

    measured = run_worker(ours_rollout, backend_name="torch", rows=2, max_new=4, model=str(tiny_model_dir))
    assert measured["tokens_per_s"] > 0 and measured["peak_rss_gb"] > 0.1
