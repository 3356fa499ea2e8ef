"""Prometheus exposition: a strict parser of the text format, and exact values."""

from __future__ import annotations

import math
import re

import pytest

from qwenvl_pd.messages import LoadReport
from qwenvl_pd.proxy.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, ProxyMetrics, Registry

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
VALUE = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf)|NaN"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({NAME})(\{{{LABEL}(?:,{LABEL})*\}})? ({VALUE})$")
HELP = re.compile(rf"^# HELP ({NAME}) .*$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram)$")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, ((label, value), ...)): value}; fails on anything the format does not allow."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, tuple], float] = {}
    for line in text[:-1].split("\n"):
        if m := TYPE.match(line):
            assert m[1] not in types, f"family declared twice: {line}"
            types[m[1]] = m[2]
            continue
        if HELP.match(line):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid exposition line: {line!r}"
        family = next(f for f in types if any(m[1] == f + s for s in SUFFIXES[types[f]]))
        labels = tuple(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        key = (m[1], labels)
        assert key not in samples, f"duplicate series {key}"
        samples[key] = float(m[3].replace("Inf", "inf"))
        assert family
    _check_histograms(types, samples)
    return samples


def _check_histograms(types, samples):
    for family, kind in types.items():
        if kind != "histogram":
            continue
        buckets = [(float(dict(lb)["le"].replace("Inf", "inf")), v) for (n, lb), v in samples.items()
                   if n == family + "_bucket"]
        assert buckets == sorted(buckets) and buckets[-1][0] == math.inf
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1][1] == samples[(family + "_count", ())]


def bucket(samples, name, le):
    return samples[(name + "_bucket", (("le", le),))]


P = "qwenvl_pd:"


def test_fresh_exposition_parses_with_zero_values():
    s = parse(ProxyMetrics().render())
    for name in ("prompt_tokens_total", "generation_tokens_total"):
        assert s[(P + name, ())] == 0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "kv_transfer_seconds"):
        assert s[(P + name + "_count", ())] == 0 and bucket(s, P + name, "+Inf") == 0
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_request_observations_exact_values():
    m = ProxyMetrics()
    m.observe_request("stop", prompt_tokens=100, generation_tokens=10, e2e_s=1.2, ttft_s=0.03,
                      itl_s=[0.01, 0.02, 0.02])
    m.observe_request("length", prompt_tokens=50, generation_tokens=16, e2e_s=0.5, ttft_s=0.3)
    m.observe_request("stop", prompt_tokens=7, generation_tokens=0, e2e_s=0.05, ttft_s=None)
    s = parse(m.render())
    assert s[(P + "prompt_tokens_total", ())] == 157
    assert s[(P + "generation_tokens_total", ())] == 26
    assert s[(P + "request_success_total", (("finished_reason", "stop"),))] == 2
    assert s[(P + "request_success_total", (("finished_reason", "length"),))] == 1
    ttft = P + "time_to_first_token_seconds"
    assert (bucket(s, ttft, "0.02"), bucket(s, ttft, "0.04"), bucket(s, ttft, "0.25"),
            bucket(s, ttft, "0.5"), bucket(s, ttft, "+Inf")) == (0, 1, 1, 2, 2)
    assert s[(ttft + "_sum", ())] == pytest.approx(0.33) and s[(ttft + "_count", ())] == 2
    itl = P + "inter_token_latency_seconds"
    assert (bucket(s, itl, "0.01"), bucket(s, itl, "0.015"), bucket(s, itl, "0.02")) == (1, 1, 3)
    e2e = P + "e2e_request_latency_seconds"
    assert (bucket(s, e2e, "0.1"), bucket(s, e2e, "0.5"), bucket(s, e2e, "2.5")) == (1, 2, 3)


def report(**kw):
    return LoadReport(**{"role": "decode", "instance_id": "10.0.0.7:50052", **kw})


def test_load_reports_set_gauges_and_count_transfer_progress():
    m = ProxyMetrics()
    m.observe_load(report(running=3, waiting=1, blocks_used=25, blocks_total=100, kv_transfers_total=2,
                          kv_transfer_bytes_total=1000, kv_transfer_seconds_total=0.02))
    m.observe_load(report(running=2, waiting=0, blocks_used=50, blocks_total=100, kv_transfers_total=6,
                          kv_transfer_bytes_total=5000, kv_transfer_seconds_total=0.42))
    m.observe_load(LoadReport("prefill", "10.0.0.5:50051", running=1, blocks_total=0))
    s = parse(m.render())
    d = (("role", "decode"), ("instance", "10.0.0.7:50052"))
    assert (s[(P + "num_requests_running", d)], s[(P + "num_requests_waiting", d)]) == (2, 0)
    assert s[(P + "kv_cache_usage_perc", d)] == 0.5
    assert s[(P + "kv_cache_usage_perc", (("role", "prefill"), ("instance", "10.0.0.5:50051")))] == 0
    assert s[(P + "kv_transfer_bytes_total", d)] == 5000
    kv = P + "kv_transfer_seconds"
    # 2 transfers at 0.01 s, then 4 more averaging 0.1 s each
    assert (bucket(s, kv, "0.01"), bucket(s, kv, "0.1"), s[(kv + "_count", ())]) == (2, 6, 6)
    assert s[(kv + "_sum", ())] == pytest.approx(0.42)


def test_instance_restart_and_forget():
    m = ProxyMetrics()
    m.observe_load(report(kv_transfers_total=5, kv_transfer_bytes_total=500))
    m.observe_load(report(kv_transfers_total=1, kv_transfer_bytes_total=70))  # restarted
    d = (("role", "decode"), ("instance", "10.0.0.7:50052"))
    assert parse(m.render())[(P + "kv_transfer_bytes_total", d)] == 570
    m.forget_instance("decode", "10.0.0.7:50052")
    assert not [k for k in parse(m.render()) if k[1] == d]


def test_embedding_counters_from_encoder_and_prefill_reports():
    m = ProxyMetrics()
    enc, pre = (("role", "encode"), ("instance", "e1")), (("role", "prefill"), ("instance", "p1"))
    m.observe_load(LoadReport("encode", "e1", embedding_hits=1, embedding_misses=3, encode_seconds_total=0.5,
                              embedding_bytes_used=256, embedding_bytes_total=1024))
    m.observe_load(LoadReport("encode", "e1", embedding_hits=3, embedding_store_hits=1, embedding_misses=3,
                              encode_seconds_total=0.75, embedding_bytes_used=512, embedding_bytes_total=1024))
    m.observe_load(LoadReport("prefill", "p1", embedding_reads=2, embedding_read_bytes=4096,
                              embedding_read_failures=1))
    m.observe_load(LoadReport("encode", "e1", embedding_misses=1))  # restarted: counts from zero
    m.encode_fallbacks.inc(reason="UNAVAILABLE")
    s = parse(m.render())
    assert [s[(P + n, enc)] for n in ("embedding_cache_hits_total", "embedding_cache_misses_total",
                                      "embedding_store_hits_total", "encode_seconds_total")] == [3, 4, 1, 0.75]
    assert (s[(P + "embedding_cache_hit_rate", enc)], s[(P + "embedding_cache_usage_perc", enc)]) == (0, 0)
    assert [s[(P + n, pre)] for n in ("embedding_read_bytes_total", "embedding_read_failures_total")] == [4096, 1]
    assert (P + "embedding_cache_hits_total", pre) not in s  # a prefill reports no encoder counters
    assert s[(P + "encode_fallbacks_total", (("reason", "UNAVAILABLE"),))] == 1
    assert (s[(P + "encode_rounds_total", ())], s[(P + "encode_round_seconds_count", ())]) == (0, 0)
    m.forget_instance("encode", "e1")
    assert not [k for k in parse(m.render()) if k[1] == enc]


def test_embedding_hit_rate_is_hits_over_lookups():
    m = ProxyMetrics()
    m.observe_load(LoadReport("encode", "e1", embedding_hits=3, embedding_misses=1))
    assert parse(m.render())[(P + "embedding_cache_hit_rate", (("role", "encode"), ("instance", "e1")))] == 0.75


def test_registry_primitives_and_escaping():
    c = Counter("t:c_total", "c", ("path",))
    c.inc(2, path='a"b\\c\nd')
    g, h = Gauge("t:g", "g"), Histogram("t:h", "h", (1.0, 0.5))
    g.set(-1.5)
    h.observe(0.7)
    text = Registry([c, g, h]).render()
    assert 't:c_total{path="a\\"b\\\\c\\nd"} 2\n' in text
    s = parse(text)
    assert s[("t:g", ())] == -1.5 and bucket(s, "t:h", "0.5") == 0 and bucket(s, "t:h", "1") == 1
    assert c.value(path='a"b\\c\nd') == 2 and h.count == 1
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, path="x")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(1, other="x")
