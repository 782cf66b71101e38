"""Stop sequences over a token stream: hold back just enough text to never leak a partial stop."""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets `stopped` when a stop sequence appeared."""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        if len(self.pending) <= self.hold:
            return ""
        split = len(self.pending) - self.hold
        out, self.pending = self.pending[:split], self.pending[split:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
