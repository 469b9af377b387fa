"""Token buckets by key, for the controller's rate limits (edge.py): pure logic, the clock passed in."""

from __future__ import annotations

from collections.abc import Hashable


class Buckets:
    """One token bucket per key: each holds up to `burst` tokens and refills at `rate` a second; a
    request takes one. A key never seen before starts full.

    Note [Bounded buckets]: keys come from callers (token ids, peer addresses), so the table is
    bounded by `max_keys`. When it is full, buckets that have refilled completely are dropped (a
    full bucket and a missing one mean the same); if every bucket is still refilling, the table is
    cleared, which hands every key a fresh burst. That takes `max_keys` distinct keys all busy at
    once: with keys that are valid token ids, more tokens than a pool has; with peer addresses,
    an attacker with that many addresses, which the limit cannot stop anyway.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"a rate limit needs a rate above 0 and a burst of at least 1, not {rate}/{burst}")
        self.rate, self.burst, self.max_keys = float(rate), float(burst), max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, as of)

    def _level(self, key: Hashable, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - then) * self.rate)

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until `key` may take a token (0: it may now). Takes nothing."""
        level = self._level(key, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def take(self, key: Hashable, now: float) -> float:
        """Take a token for `key` if it has one and return 0; else take nothing and return the
        seconds until it has one."""
        level = self._level(key, now)
        if level < 1:
            return (1 - level) / self.rate
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (level - 1, now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Note [Bounded buckets]."""
        self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self.burst}
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
