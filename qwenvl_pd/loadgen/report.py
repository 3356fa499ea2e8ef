"""Summaries (mean, median, p99), goodput, the printed table, the JSON file and a PNG of CDFs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qwenvl_pd.loadgen.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
         "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (milliseconds in, seconds out)."""
    slos = {}
    for item in items or []:
        name, sep, ms = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput entry {item!r} is not ttft|tpot|e2el:MILLISECONDS")
        slos[name] = float(ms) / 1000
    return slos


def _values(results: list[RequestResult], metric: str) -> list[float]:
    ok = [r for r in results if r.ok]
    if metric == "itl":
        return [g for r in ok for g in r.itl]
    vals = [getattr(r, metric) for r in ok]
    return [v for v in vals if v is not None]


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    return r.ok and all((getattr(r, k) or 0.0) <= v for k, v in slos.items())


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens, in_tokens = sum(r.output_tokens for r in ok), sum(r.prompt_tokens for r in ok)
    s = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
         "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
         "total_token_throughput": (in_tokens + out_tokens) / duration}
    if slos:
        s["request_goodput"] = sum(_meets(r, slos) for r in results) / duration
    for m in METRICS:
        v = np.asarray(_values(results, m)) * 1000
        for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
            s[f"{stat}_{m}_ms"] = float(fn(v)) if v.size else 0.0
        s[f"p99_{m}_ms"] = float(np.percentile(v, 99)) if v.size else 0.0
    s["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return s


def table(s: dict, slos: dict[str, float]) -> str:
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Benchmark duration (s):", f"{s['duration']:.2f}"),
            ("Total input tokens:", s["total_input_tokens"]), ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    if slos:
        rows.append(("Request goodput (req/s):", f"{s['request_goodput']:.2f}"))
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<45}{v:>15}" for k, v in rows]
    for m in METRICS:
        lines.append("{s:{c}^60}".format(s=" " + NAMES[m] + " ", c="-"))
        for stat in ("mean", "median", "p99"):
            lines.append(f"{stat.capitalize() + ' ' + m.upper() + ' (ms):':<45}{s[f'{stat}_{m}_ms']:>15.2f}")
    lines.append("=" * 60)
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def save_json(path: Path, summary: dict, results: list[RequestResult], meta: dict) -> None:
    data = {**meta, **summary, "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "e2els": [r.e2el for r in results], "output_lens": [r.output_tokens for r in results],
            "input_lens": [r.prompt_tokens for r in results]}
    path.write_text(json.dumps(data, indent=2))


def plot(path: Path, results: list[RequestResult], title: str) -> None:
    """CDFs of TTFT, TPOT, ITL and E2EL, drawn with Pillow (no plotting library needed)."""
    w, h, pad = 1000, 720, 60
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 15), title, fill="black")
    for k, m in enumerate(METRICS):
        x0, y0 = pad + (k % 2) * (w // 2), 50 + (k // 2) * ((h - 50) // 2)
        _panel(draw, (x0, y0, x0 + w // 2 - pad - 20, y0 + (h - 50) // 2 - 60),
               sorted(np.asarray(_values(results, m)) * 1000), NAMES[m] + " (ms), CDF")
    img.save(path)


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], vals: list[float], label: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    draw.text((x0, y1 + 8), label, fill="black")
    if not vals:
        draw.text((x0 + 10, y0 + 10), "no data", fill="gray")
        return
    hi = vals[-1] or 1.0
    for frac in (0.5, 1.0):
        draw.text((x0 + int(frac * (x1 - x0)) - 20, y1 + 24), f"{frac * hi:.1f}", fill="gray")
    draw.text((x0 - 30, y0), "1.0", fill="gray")
    points = [(x0 + v / hi * (x1 - x0), y1 - (i + 1) / len(vals) * (y1 - y0)) for i, v in enumerate(vals)]
    draw.line([(x0, y1)] + points, fill=(31, 119, 180), width=2)
