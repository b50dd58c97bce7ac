"""What a run reports: the JSONL log and TensorBoard (:class:`RunLog`), and per stage the
progress bar, samples/s and which steps are logged (:class:`StageProgress`)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from tqdm.auto import tqdm

# step-record fields that are counters, not curves
_NOT_CURVES = ("step", "global_step", "stage_index")


class RunLog:
    """``OUT/train_log.jsonl`` (one line per logged step) and ``OUT/tb/``, written by rank 0;
    ``history`` (every rank) is what the checkpoint keeps and restores."""

    def __init__(self, out: str, *, main: bool, tensorboard: bool, say: Callable[[str], None]):
        self.path = os.path.join(out, "train_log.jsonl")
        self.main = main
        self.history: list[dict] = []
        self._tb = None
        if main:
            os.makedirs(out, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(out, "tb"))
                except Exception as exc:  # imported here: tensorboard is an optional extra ([report])
                    say(f"tensorboard logging off ({type(exc).__name__}: {exc})")

    def restart(self, history: list[dict] | None = None) -> None:
        """Start the JSONL log over from ``history`` (a resumed run: no step appears twice)."""
        self.history = list(history or [])
        if self.main:
            with open(self.path, "w") as fh:
                for rec in self.history:
                    fh.write(json.dumps(rec) + "\n")

    def add(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.main:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in _NOT_CURVES:
                    self._tb.add_scalar(k, v, rec["global_step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class StageProgress:
    """The tqdm bar of one stage (rank 0, optional), its samples/s, and the logging cadence:
    every ``log_every`` steps, the first step run and the last step of the stage."""

    def __init__(self, *, label: str, total: int, start: int, log_every: int,
                 samples_per_step: int, bar: bool):
        self.total, self.start, self.log_every = total, start, log_every
        self.samples_per_step = samples_per_step
        self._t, self._n = time.time(), 0
        self.bar = None
        if bar and total > start:
            self.bar = tqdm(total=total, initial=start, desc=label, dynamic_ncols=True, leave=True)

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0-based, just done) is logged."""
        return (step + 1) % self.log_every == 0 or step + 1 == self.total or step == self.start

    def tick(self) -> None:
        """One optimizer step done."""
        self._n += self.samples_per_step

    def samples_per_s(self) -> float:
        """Samples/s since the last logged step (and restart the clock)."""
        now = time.time()
        sps = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return sps

    def show(self, rec: dict | None) -> None:
        """Advance the bar (with the step's record when it was logged)."""
        if self.bar is not None:
            if rec is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}",
                                     refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
