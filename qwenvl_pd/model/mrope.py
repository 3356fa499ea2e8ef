"""M-RoPE position ids of a prompt for Qwen2.5-VL and Qwen3-VL (equal to transformers 5.23's
`get_rope_index`).

Text tokens get one position on all three rows (t, h, w). Each run of image or video pad tokens
gets a (t, h, w) grid of positions offset by the running position, and the text after it resumes
at that offset + max(h, w) in merged-patch units. Qwen2.5-VL spaces video time steps by
tokens_per_second * second_per_grid_ts; Qwen3-VL places every frame at t = 0 of its own run (its
frames are separated by timestamp text). Decode needs only the delta: the token at index i >= len
gets position i + delta on all three rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenvl_pd.model.vision_config import normalize_family

TEXT, IMAGE, VIDEO = 0, 1, 2
GridsLike = Sequence[Sequence[int]] | torch.Tensor | None


def _runs(kinds: torch.Tensor) -> list[tuple[int, int, int]]:
    """[L] modality of each token -> (modality, start, end) of every maximal run."""
    cuts = (torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1).tolist()
    starts, ends = [0] + cuts, cuts + [len(kinds)]
    return [(int(kinds[s]), s, e) for s, e in zip(starts, ends)]


def _grids(grid_thw: GridsLike) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [tuple(int(x) for x in g) for g in grid_thw]


def _video_groups(video_grid_thw: GridsLike, family: str) -> list[tuple[int, int, int]]:
    # Qwen3-VL frames are separate runs (timestamp text between them): one (1, h, w) group each
    grids = _grids(video_grid_thw)
    if family == "qwen3_vl":
        return [(1, h, w) for t, h, w in grids for _ in range(t)]
    return grids


def _video_steps(n_groups: int, family: str, second_per_grid_ts, tokens_per_second) -> list:
    """Temporal position step of each video group (images always step 1)."""
    if family == "qwen3_vl":
        return [1.0] * n_groups
    if n_groups and tokens_per_second is None:
        raise ValueError("Qwen2.5-VL videos need tokens_per_second (vision_config.tokens_per_second)")
    if second_per_grid_ts is None:
        return [tokens_per_second * 1] * n_groups  # transformers' default of 1 second per grid step
    # float32, as the processor's BatchFeature hands it to the model: the rounding of t * step must match
    secs = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).flatten()
    if len(secs) != n_groups:
        raise ValueError(f"got {len(secs)} second_per_grid_ts values for {n_groups} videos")
    return [tokens_per_second * s for s in secs]


def _vision_positions(start: int, grid: tuple[int, int, int], merge: int, step) -> torch.Tensor:
    """(t, h, w) grid -> [3, t*h'*w'] positions, h' = h/merge, w' = w/merge, time scaled by step."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tpos = (torch.arange(t) * step).long() + start  # scale first, then offset (as transformers)
    hpos, wpos = torch.arange(h) + start, torch.arange(w) + start
    grid_t, grid_h, grid_w = torch.meshgrid(tpos, hpos, wpos, indexing="ij")  # each [t, h', w']
    return torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1)


def _check_runs(runs, kind: int, groups: list, merge: int, name: str) -> None:
    lengths = [e - s for k, s, e in runs if k == kind]
    if len(lengths) != len(groups):
        raise ValueError(f"prompt has {len(lengths)} {name} placeholder run(s) but {len(groups)} {name} "
                         f"grid group(s) were given")
    for i, (n, (t, h, w)) in enumerate(zip(lengths, groups)):
        if n != t * h * w // merge**2:
            raise ValueError(f"{name} run {i} has {n} tokens but its grid ({t}, {h}, {w}) needs "
                             f"{t * h * w // merge**2}")


def mrope_positions(input_ids: Sequence[int] | torch.Tensor, image_grid_thw: GridsLike = None,
                    video_grid_thw: GridsLike = None, spatial_merge_size: int = 2, *, family: str,
                    image_token_id: int = 151655, video_token_id: int = 151656,
                    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
                    tokens_per_second: int | float | None = None) -> tuple[torch.Tensor, int]:
    """Expanded prompt ids [L] -> (positions [3, L] long, delta) with decode position = index + delta."""
    fam = normalize_family(family)
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("mrope_positions needs a non-empty prompt")
    kinds = (ids == image_token_id).long() * IMAGE + (ids == video_token_id).long() * VIDEO
    runs = _runs(kinds)
    images, videos = _grids(image_grid_thw), _video_groups(video_grid_thw, fam)
    _check_runs(runs, IMAGE, images, spatial_merge_size, "image")
    _check_runs(runs, VIDEO, videos, spatial_merge_size, "video")
    steps = {IMAGE: iter([1] * len(images)),
             VIDEO: iter(_video_steps(len(videos), fam, second_per_grid_ts, tokens_per_second))}
    pos = _fill(runs, {IMAGE: iter(images), VIDEO: iter(videos)}, steps, spatial_merge_size, len(ids))
    return pos, int(pos.max()) + 1 - len(ids)


def _fill(runs, groups: dict, steps: dict, merge: int, length: int) -> torch.Tensor:
    """Walk the runs left to right, text resuming at the running position after each group."""
    pos = torch.empty(3, length, dtype=torch.long)
    cur = 0
    for kind, s, e in runs:
        if kind == TEXT:
            pos[:, s:e] = torch.arange(cur, cur + e - s)
            cur += e - s
            continue
        grid = next(groups[kind])
        pos[:, s:e] = _vision_positions(cur, grid, merge, next(steps[kind]))
        cur += max(grid[1], grid[2]) // merge
    return pos


def decode_positions(start: int, count: int, delta: int) -> torch.Tensor:
    """Positions [3, count] of generated tokens at indices start..start+count-1."""
    return (torch.arange(start, start + count) + delta).view(1, -1).expand(3, -1).clone()
