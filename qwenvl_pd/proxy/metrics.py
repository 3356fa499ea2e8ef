"""Prometheus metrics of the proxy, in the text exposition format (version 0.0.4).

A few dozen lines of registry instead of prometheus_client: the proxy exports a fixed, small set
of series, and this keeps the role's dependencies to what it already has. Names follow vLLM's
``prefix:name`` style so existing dashboards need only a prefix change.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

from qwenvl_pd.messages import LoadReport

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "Registry", "ProxyMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0,
               480.0, 960.0)
Labels = tuple[str, ...]
# LoadReport totals that only grow while an instance lives: one going down means a restart
TOTALS = ("kv_transfers_total", "kv_transfer_bytes_total", "requests_total", "embedding_hits",
          "embedding_store_hits", "embedding_misses", "embedding_reads", "embedding_read_bytes",
          "embedding_read_failures")


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def lines(self) -> list[str]:
        with self._lock:
            samples = self._samples()
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *samples]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class _Scalar(_Metric):
    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help, label_names)
        self._values: dict[Labels, float] = {}

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def remove(self, **labels: str) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)

    def _samples(self) -> list[str]:
        # an unlabelled series exists from the start (0), as prometheus_client shows it
        values = self._values or ({} if self.label_names else {(): 0.0})
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in sorted(values.items())]


class Counter(_Scalar):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # per bucket, the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    @property
    def count(self) -> int:
        return sum(self._counts)

    def _samples(self) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self._counts):
            running += n  # the format wants cumulative counts
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        return out + [f"{self.name}_sum {_fmt(self._sum)}", f"{self.name}_count {running}"]


class Registry:
    def __init__(self, metrics: Iterable[_Metric] = ()) -> None:
        self._metrics = list(metrics)

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "".join(line + "\n" for m in self._metrics for line in m.lines())


class ProxyMetrics:
    """The proxy's series. Request-level values come from the proxy's own clock; load gauges and
    KV transfer totals from the instances' LoadReports."""

    def __init__(self, prefix: str = "qwenvl_pd") -> None:
        p, ri = prefix + ":", ("role", "instance")
        r = self.registry = Registry()
        self.ttft = r.add(Histogram(p + "time_to_first_token_seconds", "Time to first token.",
                                    LATENCY_BUCKETS))
        self.itl = r.add(Histogram(p + "inter_token_latency_seconds", "Time between streamed tokens.",
                                   ITL_BUCKETS))
        self.e2e = r.add(Histogram(p + "e2e_request_latency_seconds", "Request latency.", E2E_BUCKETS))
        self.kv_seconds = r.add(Histogram(p + "kv_transfer_seconds", "KV cache transfer time.",
                                          LATENCY_BUCKETS))
        self.running = r.add(Gauge(p + "num_requests_running", "Requests running on an instance.", ri))
        self.waiting = r.add(Gauge(p + "num_requests_waiting", "Requests queued on an instance.", ri))
        self.kv_usage = r.add(Gauge(p + "kv_cache_usage_perc", "KV cache blocks in use (0-1).", ri))
        self.prompt_tokens = r.add(Counter(p + "prompt_tokens_total", "Prompt tokens processed."))
        self.generation_tokens = r.add(Counter(p + "generation_tokens_total", "Tokens generated."))
        self.success = r.add(Counter(p + "request_success_total", "Finished requests.",
                                     ("finished_reason",)))
        self.kv_bytes = r.add(Counter(p + "kv_transfer_bytes_total", "KV cache bytes transferred.", ri))
        self._add_epd(p, ri)
        self._last: dict[tuple[str, str], LoadReport] = {}

    def _add_epd(self, p: str, ri: tuple[str, str]) -> None:
        """The encode round (the proxy's clock) and the encoders' and prefills' embedding counters."""
        r = self.registry
        self.encode_round_seconds = r.add(Histogram(p + "encode_round_seconds", "Encode round latency "
                                                    "(proxy -> encoder -> handles).", LATENCY_BUCKETS))
        self.encode_rounds = r.add(Counter(p + "encode_rounds_total", "Encode rounds that returned handles."))
        self.encode_skips = r.add(Counter(p + "encode_round_skips_total", "Encode rounds skipped: the "
                                          "prefill was sent every item of the request lately."))
        self.encode_fallbacks = r.add(Counter(p + "encode_fallbacks_total", "Requests whose media went to "
                                              "prefill as bytes after an encode failure.", ("reason",)))
        self.encode_retries = r.add(Counter(p + "encode_retries_total", "Encodes tried again on another "
                                            "encoder after one failed.", ("reason",)))
        self.embedding_hits = r.add(Counter(p + "embedding_cache_hits_total", "Media items an encoder "
                                            "served from its pool or the store.", ri))
        self.embedding_misses = r.add(Counter(p + "embedding_cache_misses_total", "Media items an "
                                              "encoder encoded.", ri))
        self.embedding_store_hits = r.add(Counter(p + "embedding_store_hits_total", "Media items an "
                                                  "encoder got from the Mooncake Store.", ri))
        self.embedding_hit_rate = r.add(Gauge(p + "embedding_cache_hit_rate", "An encoder's hits / "
                                              "(hits + misses) since it started.", ri))
        self.encode_seconds = r.add(Counter(p + "encode_seconds_total", "Seconds in the vision tower.", ri))
        self.embedding_usage = r.add(Gauge(p + "embedding_cache_usage_perc", "Embedding pool bytes in "
                                           "use (0-1).", ri))
        self.embedding_read_bytes = r.add(Counter(p + "embedding_read_bytes_total", "Embedding bytes a "
                                                  "prefill read from encoders or the store.", ri))
        self.embedding_read_failures = r.add(Counter(p + "embedding_read_failures_total", "Embedding "
                                                     "reads that failed on a prefill.", ri))

    def render(self) -> str:
        return self.registry.render()

    def observe_request(self, finished_reason: str, prompt_tokens: int, generation_tokens: int,
                        e2e_s: float, ttft_s: float | None = None, itl_s: Iterable[float] = ()) -> None:
        """One finished request (ttft None when no token was produced)."""
        self.success.inc(finished_reason=finished_reason)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.e2e.observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        for gap in itl_s:
            self.itl.observe(gap)

    def observe_load(self, report: LoadReport) -> None:
        """Set an instance's gauges and add its KV transfer progress since its last report."""
        labels = {"role": report.role, "instance": report.instance_id}
        self.running.set(report.running, **labels)
        self.waiting.set(report.waiting, **labels)
        self.kv_usage.set(report.blocks_used / report.blocks_total if report.blocks_total else 0.0, **labels)
        last = self._last.get((report.role, report.instance_id))
        # totals below the last report mean the instance restarted: everything since is new
        if last is None or any(getattr(report, f) < getattr(last, f) for f in TOTALS):
            last = LoadReport(report.role, report.instance_id)
        self._last[(report.role, report.instance_id)] = report
        self.kv_bytes.inc(max(0, report.kv_transfer_bytes_total - last.kv_transfer_bytes_total), **labels)
        n = report.kv_transfers_total - last.kv_transfers_total
        if n > 0:  # reports carry totals only: each new transfer is counted at the interval's mean
            seconds = report.kv_transfer_seconds_total - last.kv_transfer_seconds_total
            self.kv_seconds.observe(seconds / n, n)
        self._observe_embeddings(report, last, labels)

    def _observe_embeddings(self, report: LoadReport, last: LoadReport, labels: dict[str, str]) -> None:
        for metric, f in self._embedding_totals(report.role):
            metric.inc(max(0, getattr(report, f) - getattr(last, f)), **labels)
        if report.role == "encode":
            lookups = report.embedding_hits + report.embedding_misses
            self.embedding_hit_rate.set(report.embedding_hits / lookups if lookups else 0.0, **labels)
            total = report.embedding_bytes_total
            self.embedding_usage.set(report.embedding_bytes_used / total if total else 0.0, **labels)

    def _embedding_totals(self, role: str = ""):
        """(counter, LoadReport field) of `role`'s embedding totals ("": every role's)."""
        encode = ((self.embedding_hits, "embedding_hits"), (self.embedding_misses, "embedding_misses"),
                  (self.embedding_store_hits, "embedding_store_hits"),
                  (self.encode_seconds, "encode_seconds_total"))
        prefill = ((self.embedding_read_bytes, "embedding_read_bytes"),
                   (self.embedding_read_failures, "embedding_read_failures"))
        return {"encode": encode, "prefill": prefill, "": encode + prefill}.get(role, ())

    def forget_instance(self, role: str, instance: str) -> None:
        """Drop a departed instance's series so dashboards stop showing its last values."""
        per_instance = (self.running, self.waiting, self.kv_usage, self.kv_bytes, self.embedding_hit_rate,
                        self.embedding_usage, *(m for m, _ in self._embedding_totals()))
        for metric in per_instance:
            metric.remove(role=role, instance=instance)
        self._last.pop((role, instance), None)
