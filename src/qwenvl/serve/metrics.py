"""The server's Prometheus metrics, written in the text exposition format (no client library needed).

Counters and histograms are updated from the engine thread and the request handlers (each takes a lock);
gauges read the engine's state when ``/metrics`` is scraped.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

__all__ = ["Counter", "Gauge", "Histogram", "ServeMetrics"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    """``labelled``: counted by labels only, so that no unlabelled series is shown before the first count (as
    prometheus_client shows none: it would appear as a series of its own, then vanish)."""

    def __init__(self, name: str, help: str, labelled: bool = False) -> None:
        self.name, self.help, self.labelled = name, help, labelled
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items()) or ([] if self.labelled else [((), 0)])
        lines += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in items]
        return lines


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = [*sorted(buckets), math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            for k, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[k] += 1
                    break

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            total = 0
            for bound, c in zip(self.bounds, self.counts):
                total += c
                lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {total}')
            lines += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {total}"]
        return lines


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    """Everything ``/metrics`` reports. ``queue_depth`` and ``active_slots`` read the engine when scraped."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, active_slots: Callable[[], float] = lambda: 0,
                 slots: int = 0) -> None:
        self.requests = Counter("qwenvl_requests_total", "HTTP requests answered, by endpoint and status code",
                                labelled=True)
        self.finished = Counter("qwenvl_sequences_finished_total",
                                "generations ended, by reason (stop, length, cancelled, error)", labelled=True)
        self.prompt_tokens = Counter("qwenvl_prompt_tokens_total", "prompt tokens prefilled")
        self.generation_tokens = Counter("qwenvl_generation_tokens_total", "tokens generated")
        self.queue_depth = Gauge("qwenvl_queue_depth", "requests waiting for a decode slot", queue_depth)
        self.active_slots = Gauge("qwenvl_active_slots", "decode slots holding a sequence", active_slots)
        self.slots = Gauge("qwenvl_slots", "decode slots (--max_batch_size)", lambda: slots)
        self.request_body_bytes = Gauge("qwenvl_request_body_bytes_in_flight",
                                        "bytes of request bodies held, from their arrival until their requests are "
                                        "prepared", lambda: 0)
        self.request_body_bytes_limit = Gauge("qwenvl_request_body_bytes_limit",
                                              "bytes of request bodies held at once, at most "
                                              "(--max_request_bytes_in_flight)", lambda: 0)
        self.server_busy = Counter("qwenvl_server_busy_total",
                                   "requests answered 503 server_busy: their body would have taken the bytes held "
                                   "over --max_request_bytes_in_flight")
        self.batch_size = Histogram("qwenvl_batch_size", "sequences per decode step", (1, 2, 4, 8, 16, 32, 64))
        self.time_to_first_token = Histogram("qwenvl_time_to_first_token_seconds",
                                             "from a request's arrival at the engine to its first token", _LATENCY)
        self.inter_token_latency = Histogram("qwenvl_inter_token_latency_seconds",
                                             "between two tokens of one sequence", _LATENCY)
        self.request_latency = Histogram("qwenvl_request_latency_seconds",
                                         "from a request's arrival at the engine to its end", _LATENCY)

    def render(self) -> str:
        parts: list[Counter | Gauge | Histogram] = [
            self.requests, self.finished, self.prompt_tokens, self.generation_tokens, self.queue_depth,
            self.active_slots, self.slots, self.request_body_bytes, self.request_body_bytes_limit, self.server_busy,
            self.batch_size, self.time_to_first_token, self.inter_token_latency,
            self.request_latency]
        return "\n".join(line for m in parts for line in m.render()) + "\n"
