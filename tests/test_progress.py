"""Progress without a terminal: log lines at every tenth of the work and while a long step runs."""
import logging
import time

from shared.runtime.progress import LoggedProgress, duration


def test_a_line_at_every_tenth_with_the_numbers_a_reader_needs(caplog):
    caplog.set_level(logging.INFO, logger="local_reasoning")
    with LoggedProgress(40, "SFT", every_s=3600) as bar:
        for _ in range(40):
            bar.set_postfix({"loss": "0.5000", "tokens/s": "900"})
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == [f"{4 * n}/40" for n in range(0, 11)]  # the start, each tenth
    assert lines[1].startswith("SFT 4/40 steps (10%), loss 0.5000, tokens/s 900, elapsed ")
    assert "remaining" in lines[1] and "remaining" not in lines[0]


def test_a_step_longer_than_the_interval_still_logs(caplog):
    caplog.set_level(logging.INFO, logger="local_reasoning")
    with LoggedProgress(1000, "GRPO", initial=10, every_s=0.5) as bar:
        deadline = time.monotonic() + 60  # no update at all: the watcher speaks (on a busy machine, later)
        while len(caplog.records) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 4 and all(line.startswith("GRPO 10/1000 steps (1%), elapsed ") for line in lines)


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (4.2, 65, 3725)] == ["4s", "1m05s", "1h02m"]
