import subprocess
import sys
from pathlib import Path

from bench.digit_accuracy import digit_roles
from shared.tasks.addition.data import Problem, reasoning_target

ROOT = Path(__file__).resolve().parents[1]


def test_each_digit_of_each_sum_gets_its_place():
    text = reasoning_target(Problem((23, 15, 8)))  # 23 + 15 = 38, 38 + 8 = 46
    roles = digit_roles(text)
    named = {role: text[offset] for offset, role in roles.items()}
    assert named["step 1 sum: tens"] == "3" and named["step 1 sum: units"] == "8"
    assert named["step 2 sum: tens"] == "4" and named["step 2 sum: units"] == "6"
    assert named["answer: units"] == "6" and "answer: hundreds" not in named
    assert len(roles) == 8


def test_reports_every_digit_of_a_real_checkpoint(tiny_model_dir):
    result = subprocess.run([sys.executable, "bench/digit_accuracy.py", str(tiny_model_dir), "--problems", "10"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-500:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| step") or line.startswith("| answer")]
    assert any(row.startswith("| step 1 sum: units |") for row in rows)
    assert all(row.split("|")[3].strip() != "0" for row in rows)
