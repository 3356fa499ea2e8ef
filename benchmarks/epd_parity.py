"""EPD parity, end to end on loopback (issue 28): for each family's tiny checkpoint, one image,
two images and a video, greedy and seeded, through real proxies: EPD (an encoder without the
store, e0) and EPD with the Mooncake Store tier (es) give PD's text at P/D TP 1 and 2, PD's equals
the colocated engine's, and greedy the colocated tokens equal transformers'. Every EPD request
must be an encode round (the proxy's encode_rounds_total grows, encode_fallbacks_total stays 0).
Then the same image through two prefills is encoded once, with and without the store, and with
the store also after the encoder that made it was SIGKILLed and restarted (a store hit).

    PYTHONPATH=$PWD python benchmarks/epd_parity.py [FAMILY ...]   # all three; exit 1 on any mismatch
"""
from __future__ import annotations

import base64
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from epd_parity_cluster import Cluster  # noqa: E402

from qwenvl_pd import LLM, SamplingParams  # noqa: E402
from qwenvl_pd.model import parity  # noqa: E402
from qwenvl_pd.model.tiny import make_tiny  # noqa: E402
from qwenvl_pd.serve import grpc_serving  # noqa: E402

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
SAMPLING = {"greedy": dict(temperature=0), "seeded": dict(temperature=0.8, top_p=0.9, seed=1234)}
ROUTES = {1: ("pd1", "epd1", "epds1"), 2: ("pd2", "epd2", "epds2")}  # TP -> PD, EPD, EPD(store)
PREFILL = {"epd1": "p0", "epds1": "p1", "epd2": "p2", "epds2": "p3", "epd1b": "p1", "epds1a": "p0"}
MAX_TOKENS, TEXT = 8, "Describe what you see."
MIME = {"image": "image/png", "video": "video/mp4"}
PROBLEMS: list[str] = []  # an EPD request that was no encode round proves nothing: a failure


def png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mp4(frames: int = 8, w: int = 64, h: int = 48) -> bytes:
    """Noise frames at 4 fps: every frame differs, so a wrong frame or order changes the answer."""
    import av
    buf, rng = io.BytesIO(), np.random.default_rng(7)
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


MEDIA = {"one image": [("image", png(96, 80, 1))],
         "two images": [("image", png(64, 120, 2)), ("image", png(150, 60, 3))],
         "video": [("video", mp4())]}


def messages(items) -> list:
    parts = [{"type": f"{k}_url", f"{k}_url": {"url": f"data:{MIME[k]};base64," + base64.b64encode(d).decode()}}
             for k, d in items]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": TEXT}]}]


def offline_request(llm: LLM, items) -> dict:
    content = [{"type": k} for k, _ in items] + [{"type": "text", "text": TEXT}]
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
    mm = {kind: [d for k, d in items if k == kind] for kind in MIME}
    return {"prompt": prompt, "multi_modal_data": {k: v for k, v in mm.items() if v}}


def transformers_greedy(ref, llm: LLM, request: dict) -> list[int]:
    """transformers' greedy tokens for the prompt our processor made (qwenvl_pd.model.parity)."""
    return parity.greedy(ref, llm.inputs.process(request), MAX_TOKENS).tokens


def references(model: str) -> dict:
    """(media, sampling) -> (colocated text, prompt tokens, colocated tokens == transformers' or None)."""
    llm = LLM(model=model, max_model_len=2048)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    refs = {}
    for media, items in MEDIA.items():
        request = offline_request(llm, items)
        for name, kw in SAMPLING.items():
            out = llm.generate(request, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **kw))[0]
            same = transformers_greedy(ref, llm, request) == out.outputs[0].token_ids if name == "greedy" else None
            refs[media, name] = (out.outputs[0].text, len(out.prompt_token_ids), same)
    llm.close()
    return refs


def ask(c: Cluster, proxy: str, items, sampling: str) -> tuple[str, int]:
    """(text, prompt tokens) of one request; an EPD proxy must have run an encode round for it
    and fallen back to bytes never."""
    rounds = c.metric(proxy, "encode_rounds_total")
    r = c.client(proxy).chat.completions.create(model=c.served, messages=messages(items), max_tokens=MAX_TOKENS,
                                                extra_body={"ignore_eos": True}, **SAMPLING[sampling])
    assert r.choices[0].finish_reason == "length", r
    if proxy.startswith("epd") and c.metric(proxy, "encode_rounds_total") != rounds + 1:
        PROBLEMS.append(f"{proxy}: {sampling} {[k for k, _ in items]} was no encode round")
    if proxy.startswith("epd") and c.metric(proxy, "encode_fallbacks_total"):
        PROBLEMS.append(f"{proxy}: {sampling} {[k for k, _ in items]}: encode fallbacks")
    return r.choices[0].message.content, r.usage.prompt_tokens


def reads(c: Cluster, proxy: str) -> int:
    return c.load(PREFILL[proxy]).embedding_reads


def parity_rows(c: Cluster, family: str, refs: dict) -> list[tuple]:
    rows = []
    for tp, (pd, epd, epds) in ROUTES.items():
        for media, items in MEDIA.items():
            for sampling in SAMPLING:
                col_text, col_prompt, tf = refs[media, sampling]
                got, read = {}, []
                for proxy in (pd, epd, epds):
                    before = reads(c, proxy) if proxy != pd else 0
                    got[proxy] = ask(c, proxy, items, sampling)
                    read += [str(reads(c, proxy) - before)] if proxy != pd else []
                colocated = got[epd] == got[epds] == (col_text, col_prompt)
                rows.append((family, tp, media, sampling, got[epd] == got[pd], got[epds] == got[pd], colocated,
                             None if tf is None else tf and colocated, "/".join(read), repr(got[pd][0])[:28]))
    return rows


def print_table(rows: list[tuple]) -> None:
    head = ("family", "TP", "media", "sampling", "EPD==PD", "EPD(store)==PD", "==colocated", "==transformers",
            "reads e0/es", "PD's text")
    cells = [head] + [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))


def encoder_counts(c: Cluster, node: str) -> tuple[int, int, int]:
    load = c.load(node)
    return load.embedding_misses, load.embedding_hits, load.embedding_store_hits


def through_two_prefills(c: Cluster, enc: str, first: str, second: str, items, expect) -> tuple[list[str], bool]:
    """items through `first` then `second` (two prefills, one encoder): one miss, then one hit."""
    m0, h0, s0 = encoder_counts(c, enc)
    lines, ok = [], True
    for proxy in (first, second):
        text = ask(c, proxy, items, "greedy")
        m, h, s = encoder_counts(c, enc)
        lines.append(f"  {enc} after {proxy} ({PREFILL[proxy]}): misses +{m - m0} hits +{h - h0} "
                     f"store hits +{s - s0}; answer == PD: {text == expect}")
        ok &= text == expect
    ok &= (m - m0, h - h0) == (1, 1)
    return lines, ok


def restart_encoder(c: Cluster, node: str, proxy: str) -> str:
    """SIGKILL the encoder, start it again on its port, wait until `proxy` polls the new instance
    (its load round covers healthy instances only) -> the new instance id."""
    old = c.nodes[node]
    old.proc.kill()
    old.proc.wait(timeout=30)
    old.start()
    old.wait(lambda: grpc_serving(old.address), node, time.monotonic() + 300)
    new_id = c.load(node).instance_id
    deadline = time.monotonic() + 60
    while f'instance="{new_id}"' not in c.metrics_text(proxy):
        assert time.monotonic() < deadline, f"{proxy} never saw {node} healthy again"
        time.sleep(0.3)
    return new_id


def encoded_once(c: Cluster) -> tuple[list[str], bool]:
    """An image through two prefills is encoded once (e0: no store; es: the store), and with the
    store once more after es is restarted: a store hit, through a prefill that never saw it."""
    x, y = [("image", png(200, 150, 77))], [("image", png(180, 120, 78))]
    px, py = ask(c, "pd1", x, "greedy"), ask(c, "pd1", y, "greedy")
    lines, ok = through_two_prefills(c, "e0", "epd1", "epd1b", x, px)
    more, ok2 = through_two_prefills(c, "es", "epds1a", "epds1", y, py)
    new_id = restart_encoder(c, "es", "epds2")
    before = reads(c, "epds2")
    text = ask(c, "epds2", y, "greedy")
    counts, read = encoder_counts(c, "es"), reads(c, "epds2") - before
    after = (f"  es restarted ({new_id}) then epds2 (p3, TP 2): misses {counts[0]} hits {counts[1]} "
             f"store hits {counts[2]}; p3 embedding reads +{read}; answer == PD: {text == py}")
    return lines + more + [after], ok and ok2 and counts == (0, 0, 1) and read == 1 and text == py


def run_family(family: str, root: Path) -> tuple[list[tuple], list[str], bool]:
    model = str(make_tiny(family, root / family))
    c = Cluster(model)
    try:
        c.spawn_nodes(c.start_store())
        refs = references(model)  # while the nodes load
        c.wait_nodes()
        c.start_proxies()
        rows = parity_rows(c, family, refs)
        lines, ok = encoded_once(c)
    finally:
        c.stop()
    return rows, [f"{family}: the same image through two prefills"] + lines, ok


def main(families: list[str]) -> int:
    rows, counters, ok = [], [], True
    with tempfile.TemporaryDirectory() as root:
        for family in families:
            t0 = time.monotonic()
            r, lines, once = run_family(family, Path(root))
            rows, counters, ok = rows + r, counters + lines, ok and once
            print(f"{family}: {time.monotonic() - t0:.0f} s", flush=True)
    print_table(rows)
    print("\n".join(counters + PROBLEMS))
    ok = ok and not PROBLEMS and all(v is not False for row in rows for v in row[4:8])
    print("PASS" if ok else "FAIL: a mismatch above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(FAMILIES)))
