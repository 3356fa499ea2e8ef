"""benchmarks/epd_workloads.py: the shapes the issue asks of the two EPD workloads (2-4 images of
448-896 px, about half of the image slots repeated; one request in ten with one image), and the
same requests on every call (every mode is measured on the same bytes)."""
import base64
import io
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[3] / "benchmarks"))
from epd_workloads import WorkloadConfig, build, image_slots  # noqa: E402

CFG = WorkloadConfig(requests=20)


def test_image_heavy_has_2_to_4_distinct_images_per_request_half_of_them_shared():
    slots = image_slots("image-heavy", CFG)
    assert [len(s) for s in slots] == [4, 3, 4, 2, 4, 2, 2, 4, 3, 2, 3, 4, 2, 4, 2, 3, 2, 4, 3, 4]
    assert all(len(set(s)) == len(s) for s in slots)  # a request never holds one image twice
    uses = Counter(item for s in slots for item in s)
    shared = {item: n for item, n in uses.items() if item[0] < 1000}  # seeds of the shared set
    assert (sum(shared.values()), sum(uses.values()), len(shared)) == (25, 61, 9)
    assert all(n == 1 for item, n in uses.items() if item not in shared)
    sides = {side for s in slots for _, w, h in s for side in (w, h)}
    assert min(sides) >= 448 and max(sides) <= 896 and all(side % 28 == 0 for side in sides)


def test_image_light_gives_one_request_in_ten_one_image():
    slots = image_slots("image-light", CFG)
    assert [i for i, s in enumerate(slots) if s] == [12, 13] and {len(s) for s in slots} == {0, 1}


def test_requests_are_the_same_every_time_text_first_then_the_images_at_their_sizes():
    first, again = (build("image-heavy", WorkloadConfig(requests=3), "m") for _ in range(2))
    assert [r.body for r in first] == [r.body for r in again]
    parts = first[0].body["messages"][0]["content"]
    assert parts[0]["type"] == "text" and parts[0]["text"].startswith("0: ")
    (_, w, h) = image_slots("image-heavy", WorkloadConfig(requests=3))[0][0]
    url = parts[1]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (w, h)
    assert first[0].body["max_tokens"] == 64 and first[0].body["ignore_eos"] is True
