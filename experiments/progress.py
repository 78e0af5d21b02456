"""Progress for runs whose stderr is not a terminal (a log file, CI, ``nohup``).

:class:`LineProgress` has the small part of tqdm's interface :class:`experiments.run.Run`
uses (``update``, ``set_postfix_str``, ``write``, ``close``) and prints one plain line every
``every`` seconds instead of redrawing a bar, so a long run writes a readable log.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

LINE_EVERY_S = 5.0
# the time left is estimated from the rate over about the last minute, not since the start:
# a run's phases differ in cost per step (maml's iMAML steps are several times MAML's), so
# the average since the start would promise a minute while ten are left
RATE_WINDOW_S = 60.0


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``.

    Example:
        >>> _duration(42.4), _duration(185), _duration(3725)
        ('42s', '3m05s', '1h02m')
    """
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """One line per ``every`` seconds: ``NAME: step 120/800 (15%), 42s, ~3m50s left, PHASE``.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = LineProgress(total=4, desc="demo", file=out, every=0.0)
        >>> bar.set_postfix_str("grid loss=0.5"); bar.update(1); bar.close()
        >>> out.getvalue().splitlines()[0].startswith("demo: step 1/4 (25%)")
        True
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        initial: int = 0,
        file: TextIO | None = None,
        every: float = LINE_EVERY_S,
        clock: Any = time.monotonic,
    ) -> None:
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.file = file if file is not None else sys.stderr
        self.clock = clock
        self.start_n = initial
        self.t0 = self.last = clock()
        self.postfix = ""
        self.printed_n = -1
        self.samples: deque[tuple[float, int]] = deque([(self.t0, initial)])

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.every:
            self._line()

    def write(self, message: str) -> None:
        print(message, file=self.file, flush=True)

    def close(self) -> None:
        if self.printed_n != self.n and self.n > self.start_n:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        self.last, self.printed_n = now, self.n
        elapsed = now - self.t0
        text = f"{self.desc}: step {self.n}"
        if self.total:
            text += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        text += f", {_duration(elapsed)}"
        while len(self.samples) > 1 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t_base, n_base = self.samples[0]
        done = self.n - n_base
        if self.total and done > 0 and self.n < self.total and now > t_base:
            text += f", ~{_duration((now - t_base) / done * (self.total - self.n))} left"
        self.samples.append((now, self.n))
        if self.postfix:
            text += f", {self.postfix}"
        print(text, file=self.file, flush=True)
