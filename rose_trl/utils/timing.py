"""Wall time by stage of a run: where the seconds go, logged at the end and written to `<output_dir>/timings.json`.

    with stage("pool gradient passes"):      # anywhere in the package; nested stages are taken off the outer one
        ...
    clock.start()                            # the pipeline, when a run begins
    clock.report()                           # {"stages": {name: seconds}, "wall_s": ..., "other_s": ...}

Each stage's seconds are its own: a stage entered inside another (the callback's gradient passes inside the
warm-up's `trainer.train()`) is counted once, under its own name, and taken off the outer stage. So the stages sum
to the wall time spent inside any of them; `other_s` is the rest of the run's wall time (between stages).
One clock a process (`clock`); under several processes each times its own work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageClock:
    def __init__(self):
        self.start()

    def start(self) -> None:
        """From now on: every stage's seconds back to 0, the run's wall time from here."""
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, seconds spent in the stages nested inside it]
        self.began = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            _, nested = self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1][1] += elapsed

    def add(self, name: str, seconds: float) -> None:
        """`seconds` measured by other means (between two Trainer events) counted to `name`, and taken off the
        stage running now."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self._stack:
            self._stack[-1][1] += seconds

    def report(self) -> dict:
        wall = time.perf_counter() - self.began
        stages = {name: round(s, 3) for name, s in self.seconds.items()}
        return {"wall_s": round(wall, 3), "stages": stages, "other_s": round(wall - sum(self.seconds.values()), 3)}

    def describe(self) -> str:
        report = self.report()
        wall = max(report["wall_s"], 1e-9)
        rows = [*report["stages"].items(), ("other (between stages)", report["other_s"])]
        width = max(len(name) for name, _ in rows)
        lines = [f"stage times: {report['wall_s']:.1f} s wall in all"]
        lines += [f"  {name:<{width}}  {s:8.1f} s  {100 * s / wall:5.1f}%" for name, s in rows]
        return "\n".join(lines)


clock = StageClock()


def stage(name: str):
    """`clock.stage(name)`: the block's wall time counted to the stage `name`."""
    return clock.stage(name)
