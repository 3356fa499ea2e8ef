"""Fault soak: minutes of mixed load on a PD cluster while its nodes are killed, hung and drained.

Two prefills and two decodes of a tiny model behind one proxy, all on loopback. Clients send
text, images, streaming, n > 1, bad requests, and streams they walk away from; meanwhile one
node at a time is SIGKILLed and restarted, SIGSTOPped for a few seconds, or SIGTERMed (drain)
and restarted; some prompts are far over the context length (a 400, while the rest go on).
`--kv-transfer-mode layerwise` runs the proxy's layer-wise round instead of the whole-KV one.
`--encode-faults` adds an encoder (EPD; `--num-encode N` for more) and faults only it: SIGKILL
and restart, SIGSTOP for a few seconds then SIGCONT; a prefill can always encode, so the client
must see no error at all (bad requests aside), and the proxy's encode fallbacks are printed.
Every request is classified by what the client saw:

  completed / failed cleanly (an OpenAI error body or stream error event, then [DONE]) /
  hung (past the client's deadline) / torn (a stream that ends without [DONE]) / unclean
  (an error without the OpenAI body, or a bad request that was accepted)

At the end it prints requests sent, outcomes by reason, the outcomes of the requests sent while
each fault was under way (from its injection to a few seconds after the node is back), and each
live node's used KV blocks (an encoder's pinned embedding leases) once leases have run out. Exit
code 0 when nothing hung, tore or was unclean and every live node is back to 0 blocks and 0 leases
(with --encode-faults also: no client-visible error).

    python benchmarks/soak.py --duration 120
    python benchmarks/soak.py --duration 120 --encode-faults
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from soak_cluster import Node, free_port, settled_blocks, start_proxy, wait_serving  # noqa: E402

from qwenvl_pd.serve import tiny_model_dir  # noqa: E402

BAD = "unclean", "hung", "torn"
FAULTS = "kill", "hang", "drain"
FAULT_TAIL_S = 3.0  # requests sent this long after a node is back still count under its fault
CLIENT_ERRORS = ("failed", "stream error")  # what a client sees as an error (bad requests aside)
ROLES = "prefill", "decode"
ENCODE_FAULTS = "kill", "hang"  # --encode-faults, in turn (drain: a gentler restart than kill)
WORDS = "the sea sky red blue cat dog runs over under a small large house tree river".split()


def _image_url(rng: random.Random) -> str:
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bad_body(rng: random.Random, model: str) -> dict:
    msg = [{"role": "user", "content": "hi"}]
    return rng.choice([
        {"model": model, "messages": msg, "max_tokens": -1},
        {"model": "no-such-model", "messages": msg},
        {"model": model, "messages": "not a list"},
        {"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]},
        {"model": model, "messages": msg, "stop_token_ids": list(range(5000))},
    ])


def make_request(rng: random.Random, model: str, image_weight: int = 15) -> tuple[str, dict]:
    """(kind, body): kind says what the client expects and how it reads the answer."""
    kind = rng.choices(["text", "stream", "image", "n2", "walk_away", "bad", "huge"],
                       [30, 20, image_weight, 10, 10, 12, 3])[0]
    if kind == "bad":
        return kind, _bad_body(rng, model)
    if kind == "huge":  # megabytes of prompt: refused without stalling the other requests
        return "bad", {"model": model, "messages": [{"role": "user", "content": "x" * rng.randint(1 << 20, 8 << 20)}]}
    content = " ".join(rng.choices(WORDS, k=rng.randint(4, 60)))
    if kind == "image":
        content = [{"type": "image_url", "image_url": {"url": _image_url(rng)}}, {"type": "text", "text": content}]
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": rng.randint(4, 32), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
    body["stream"] = kind in ("stream", "walk_away") or (kind == "image" and rng.random() < 0.5)
    body["n"] = 2 if kind == "n2" else 1
    return kind, body


EXAMPLES: dict[str, str] = {}  # outcome -> the first message seen with it


def _seen(reason: str, message: str) -> str:
    EXAMPLES.setdefault(reason, message[:300])
    return reason


def _error_reason(status: int, text: str) -> str:
    try:
        err = json.loads(text)["error"]
        if isinstance(err["message"], str):
            return _seen(f"failed {status} {err.get('code') or err['type']}", err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return _seen("unclean", f"{status}: {text}")


async def _read_stream(resp: httpx.Response, walk_away: bool) -> str:
    chunks = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return "completed"
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            if not isinstance(err.get("message"), str):
                return _seen("unclean", data)
            return _seen(f"stream error event {err.get('code') or err.get('type')}", err["message"])
        chunks += 1
        if walk_away and chunks == 2:
            return "walked away"  # closing the response cancels the request upstream
    return _seen("torn", f"stream ended after {chunks} chunks without [DONE]")


async def send(client: httpx.AsyncClient, url: str, kind: str, body: dict, deadline: float) -> str:
    try:
        async with asyncio.timeout(deadline):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    return "rejected (bad request)" if kind == "bad" and resp.status_code in (400, 404) \
                        else _error_reason(resp.status_code, text)
                if kind == "bad":
                    return _seen("unclean", f"accepted: {json.dumps(body)[:200]}")  # must never be
                if body.get("stream"):
                    return await _read_stream(resp, kind == "walk_away")
                data = json.loads(await resp.aread())
                return "completed" if len(data["choices"]) == body["n"] else "unclean"
    except TimeoutError:
        return _seen("hung", json.dumps(body)[:200])
    except httpx.HTTPError as e:
        return _seen("torn", f"{type(e).__name__}: {e}")


UNDER_WAY = {"fault": "none"}  # the fault a request sent now runs under


async def client_loop(url: str, model: str, seed: int, stop: asyncio.Event, deadline: float, out: Counter,
                      by_fault: Counter, image_weight: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=None) as client:
        while not stop.is_set():
            kind, body = make_request(rng, model, image_weight)
            fault = UNDER_WAY["fault"]
            outcome = await send(client, url, kind, body, deadline)
            out[outcome] += 1
            out["sent"] += 1
            by_fault[fault, outcome] += 1


async def _restart(node: Node, sig: int) -> None:
    node.signal(sig)
    try:
        await asyncio.to_thread(node.proc.wait, 30)
    except subprocess.TimeoutExpired:  # a drain that does not end is itself a finding: log it
        print(f"{node.name} did not exit 30 s after signal {sig}; killing it", file=sys.stderr)
        node.proc.kill()
        node.proc.wait(10)
    node.start()
    await asyncio.to_thread(wait_serving, [node])


async def inject(node: Node, fault: str, rng: random.Random) -> None:
    if fault == "kill":
        await _restart(node, signal.SIGKILL)
    elif fault == "drain":
        await _restart(node, signal.SIGTERM)
    else:  # hang: a stopped process keeps its sockets open but answers nothing
        node.signal(signal.SIGSTOP)
        await asyncio.sleep(rng.uniform(3, 6))
        node.signal(signal.SIGCONT)


async def fault_loop(nodes: list[Node], plan: list[tuple[str, str]], seed: int, until: float,
                     interval: float, out: Counter) -> None:
    """One fault at a time: each of plan's (fault, role) once, or random ones until `until`."""
    rng = random.Random(seed)
    await asyncio.sleep(interval / 2)
    for i in itertools.count():
        if (plan and i == len(plan)) or (not plan and time.monotonic() >= until):
            return
        fault, role = plan[i] if plan else (rng.choice(FAULTS), rng.choice(ROLES))
        node = rng.choice([n for n in nodes if n.role == role])
        out[f"{fault} {role}"] += 1
        UNDER_WAY["fault"] = f"{fault} {role}"
        await inject(node, fault, rng)
        await asyncio.sleep(min(FAULT_TAIL_S, interval))
        UNDER_WAY["fault"] = "none"
        await asyncio.sleep(max(0.0, interval - FAULT_TAIL_S))


def parse_plan(spec: str, roles: tuple[str, ...] = ROLES) -> list[tuple[str, str]]:
    plan = [tuple(item.split(":")) for item in spec.split(",") if item]
    for item in plan:
        if len(item) != 2 or item[0] not in FAULTS or item[1] not in roles:
            raise SystemExit(f"--faults: {':'.join(item)!r} is not FAULT:ROLE with FAULT in {FAULTS}, ROLE in {roles}")
    return plan


async def soak(args, nodes: list[Node], url: str, model: str) -> tuple[Counter, Counter, Counter, dict]:
    """Load until --duration has passed and the fault plan is done; then each node's blocks."""
    outcomes, faults, by_fault, stop = Counter(), Counter(), Counter(), asyncio.Event()
    until = time.monotonic() + args.duration
    image_weight = 60 if args.encode_faults else 15  # most requests reach the encoder
    clients = [client_loop(url, model, args.seed + i, stop, args.deadline, outcomes, by_fault, image_weight)
               for i in range(args.clients)]
    load = asyncio.gather(*clients)
    plan = parse_plan(args.faults, ROLES + ("encode",) if args.num_encode else ROLES)
    if args.encode_faults and not plan:  # kill and hang in turn, as many as --duration holds
        plan = [(ENCODE_FAULTS[i % 2], "encode") for i in range(max(2, int(args.duration // args.fault_interval)))]
    await fault_loop(nodes, plan, args.seed, until, args.fault_interval, faults)
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    stop.set()
    await load
    for node in nodes:
        node.signal(signal.SIGCONT)
    return outcomes, faults, by_fault, await settled_blocks(nodes, timeout=30)


def _fault_table(by_fault: Counter) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for (fault, outcome), count in by_fault.items():
        row = table.setdefault(fault, {"sent": 0, "completed": 0, "client errors": 0, "bad": 0})
        row["sent"] += count
        row["completed"] += count if outcome == "completed" else 0
        row["client errors"] += count if outcome.startswith(CLIENT_ERRORS) else 0
        row["bad"] += count if outcome in BAD else 0
    print("\n| requests sent while | sent | completed | client errors | hung/torn/unclean |\n|---|---|---|---|---|")
    for fault, row in sorted(table.items()):
        print(f"| {fault} | {row['sent']} | {row['completed']} | {row['client errors']} | {row['bad']} |")
    return table


def encode_fallbacks(base: str) -> dict[str, float]:
    """The proxy's encode_fallbacks_total by reason (requests whose media went to prefill as bytes),
    and beside them the rounds that gave handles, the skipped ones and prefills' failed reads."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out = {reason: float(v) for reason, v in
           re.findall(r'^qwenvl_pd:encode_fallbacks_total\{reason="([^"]*)"\} (\S+)$', text, re.M)}
    for name in ("encode_rounds_total", "encode_round_skips_total", "embedding_read_failures_total"):
        out[f"({name})"] = sum(float(v) for v in re.findall(rf"^qwenvl_pd:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return out


def report(outcomes: Counter, faults: Counter, by_fault: Counter, blocks: dict, nodes: list[Node],
           fallbacks: dict[str, float], no_errors: bool) -> dict:
    """no_errors: a client-visible error fails the run too (only encoders were faulted)."""
    sent = outcomes.pop("sent", 0)
    errors = sum(n for reason, n in outcomes.items() if reason.startswith(CLIENT_ERRORS))
    print(f"\nrequests sent: {sent}; client-visible errors (bad requests aside): {errors}")
    print("| outcome | requests | first message |\n|---|---|---|")
    for reason, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"| {reason} | {count} | {EXAMPLES.get(reason, '')} |")
    print("\n| fault injected | times |\n|---|---|")
    for fault, count in sorted(faults.items()):
        print(f"| {fault} | {count} |")
    table = _fault_table(by_fault)
    if any(n.role == "encode" for n in nodes):
        print("\n| encode fallback reason (in parentheses: the proxy's other EPD counters) | requests |\n|---|---|")
        for reason, count in sorted(fallbacks.items()) or [("(none)", 0)]:
            print(f"| {reason} | {count:.0f} |")
    print("\n| node | used KV blocks (encode: pinned embedding leases) at the end |\n|---|---|")
    for node in nodes:
        print(f"| {node.name} | {blocks.get(node.name, 'down')} |")
    ok = not any(outcomes.get(b) for b in BAD) and all(v == 0 for v in blocks.values()) and \
        not (no_errors and errors)
    print(f"\n{'PASS' if ok else 'FAIL'}: nothing hung, tore or was unclean; every live node at 0 blocks "
          f"and 0 leases{'; no client-visible error' if no_errors else ''}")
    return {"sent": sent, "outcomes": dict(outcomes), "examples": EXAMPLES, "faults": dict(faults),
            "by_fault": table, "blocks": blocks, "client_errors": errors, "encode_fallbacks": fallbacks,
            "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the tiny random-weight Qwen2.5-VL)")
    ap.add_argument("--duration", type=float, default=120, help="seconds of load")
    ap.add_argument("--clients", type=int, default=6, help="concurrent clients, one request each at a time")
    ap.add_argument("--fault-interval", type=float, default=8, help="seconds between faults")
    ap.add_argument("--deadline", type=float, default=60, help="a request past this many seconds is hung")
    ap.add_argument("--faults", default="", help="FAULT:ROLE,... each once, in turn (kill|hang|drain : "
                    "prefill|decode); default: random ones for --duration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-transfer-mode", default="whole", choices=["whole", "layerwise"])
    ap.add_argument("--num-encode", type=int, default=0, help="encoders in front of the prefills (EPD)")
    ap.add_argument("--encode-faults", action="store_true", help="fault only the encoders (kill and "
                    "restart, SIGSTOP/SIGCONT; at least one encoder): no client-visible error allowed")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    args.num_encode = max(args.num_encode, 1 if args.encode_faults else 0)
    model = args.model or str(tiny_model_dir())
    nodes = [Node(name, model) for name in ("p0", "p1", "d0", "d1", *(f"e{i}" for i in range(args.num_encode)))]
    proxy = None
    try:
        for node in nodes:
            node.start()
        wait_serving(nodes)
        port = free_port()
        proxy = start_proxy(nodes, port, token_timeout=10, kv_transfer_mode=args.kv_transfer_mode)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
        soaked = asyncio.run(soak(args, nodes, url, served))
        result = report(*soaked, nodes, encode_fallbacks(f"http://127.0.0.1:{port}"), args.encode_faults)
    finally:
        for node in nodes:
            node.stop()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=20)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
