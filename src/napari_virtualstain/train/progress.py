"""Training progress for a person watching: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time


class TrainProgress:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) a plain line every ~5 % and at each validation,
    because a bar's carriage returns turn a log into one unreadable line."""

    def __init__(self, total: int, start: int, desc: str, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.start, self.desc = total, start, desc
        self.t0 = time.perf_counter()
        self.bar = None
        try:
            tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            tty = False
        if tty:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, file=self.stream)
            except ImportError:  # pragma: no cover
                pass

    def update(self, step: int, loss: float, seconds: float, validated: bool = False, val: dict | None = None) -> None:
        if self.bar is not None:
            if self.bar.total != self.total:  # a time budget (max_minutes) has reset the total
                self.bar.total = self.total
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        if not validated and step % max(1, round(self.total / 20)) and step != self.total:  # ~every 5 %
            return
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        line = (f"{self.desc}: step {step}/{self.total} ({100 * step / self.total:.0f} %) loss {loss:.4f} "
                f"{seconds:.1f} s {rate:.2f} steps/s")
        if val:
            line += " | val " + ", ".join(f"{n} r {m['pearson']:.3f}" for n, m in val.items() if "pearson" in m)
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
