"""Progress: a tqdm bar on a terminal; elsewhere (a log file, CI, nohup) log lines at every tenth of the
work and at least every 30 seconds. And the log format."""
from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm.auto import tqdm

logger = logging.getLogger("local_reasoning")
LOG_EVERY_S = 30.0


def progress_bar(total: int, label: str, unit: str = "step", initial: int = 0):
    if sys.stderr.isatty():
        return tqdm(total=total, desc=label, unit=unit, initial=initial, dynamic_ncols=True, leave=False)
    return LoggedProgress(total, label, unit, initial)


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LoggedProgress:
    """tqdm's update / set_postfix as log lines: one at every tenth of the total and one at least every
    `every_s` seconds, from a watcher thread while a long step runs."""

    def __init__(self, total: int, label: str, unit: str = "step", initial: int = 0, every_s: float = LOG_EVERY_S):
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.initial = self.done = initial
        self.postfix: dict[str, str] = {}
        self.began = self.last_line = time.monotonic()
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.watcher = threading.Thread(target=self.watch, daemon=True)

    def __enter__(self) -> "LoggedProgress":
        with self.lock:
            self.log()
        self.watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finished.set()
        self.watcher.join()

    def tenth(self, count: int) -> int:
        return count * 10 // max(self.total, 1)

    def update(self, count: int = 1) -> None:
        with self.lock:
            before, self.done = self.done, self.done + count
            if self.tenth(self.done) > self.tenth(before) or time.monotonic() - self.last_line >= self.every_s:
                self.log()

    def set_postfix(self, values: dict | None = None, **more) -> None:
        with self.lock:
            self.postfix = {str(k): str(v) for k, v in {**(values or {}), **more}.items()}

    def watch(self) -> None:
        while not self.finished.wait(min(1.0, self.every_s / 4)):
            with self.lock:
                if time.monotonic() - self.last_line >= self.every_s:
                    self.log()

    def log(self) -> None:
        self.last_line = now = time.monotonic()
        elapsed, done = now - self.began, self.done - self.initial
        remaining = f", remaining {duration(elapsed / done * (self.total - self.done))}" if done else ""
        values = "".join(f", {name} {value}" for name, value in self.postfix.items())
        logger.info("%s %d/%d %ss (%d%%)%s, elapsed %s%s", self.label, self.done, self.total, self.unit,
                    100 * self.done // max(self.total, 1), values, duration(elapsed), remaining)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
