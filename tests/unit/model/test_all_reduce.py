"""The row-parallel all-reduce over real gloo ranks: bf16 partial sums come back rounded once, as
one rank's float32 sum would be (transformers' single GEMM), not once per ring hop."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwenvl_pd.model.parallel import TensorParallel, all_reduce

SIZE = 3  # at 2 ranks the one addition is rounded once anyway


def _parts() -> list[torch.Tensor]:
    """SIZE partial sums [4096] in bf16, magnitudes over six decades: cancellations included."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4096, generator=g) * 10 ** (3 * torch.rand(4096, generator=g) - 2)).bfloat16()
            for _ in range(SIZE)]


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=SIZE)
    try:
        torch.save(all_reduce(_parts()[rank].clone(), TensorParallel(rank, SIZE)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_bf16_sum_over_three_ranks_is_rounded_once(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "sum")), nprocs=SIZE)
    want = torch.stack([p.float() for p in _parts()]).sum(0).bfloat16()
    for rank in range(SIZE):
        got = torch.load(tmp_path / f"sum.{rank}")
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), f"rank {rank}: {(got != want).sum()} differ"
