"""BlockTables: exact padded tables across steps, rows reused, lists replaced or grown."""
import torch

from qwenvl_pd.engine.block_tables import BlockTables
from qwenvl_pd.engine.sequence import Sequence
from qwenvl_pd.sampling_params import SamplingParams


def _seq(name: str, blocks: list[int]) -> Sequence:
    seq = Sequence(name, [1], torch.zeros(3, 1, dtype=torch.long), 0, SamplingParams())
    seq.block_ids = blocks
    return seq


def test_tables_follow_growth_replacement_and_reuse_of_rows():
    tables = BlockTables()
    a, b = _seq("a", [4, 5, 6]), _seq("b", [9])
    assert tables.gather([a, b]).tolist() == [[4, 5, 6], [9, 0, 0]]
    b.block_ids.append(2)  # grown in place: only the new id is written
    assert tables.gather([b, a]).tolist() == [[9, 2, 0], [4, 5, 6]]
    a.block_ids = [7]      # preempted and re-admitted: a new list
    assert tables.gather([a]).tolist() == [[7]]
    c = _seq("c", [3])     # takes b's row (b left the batch): b's ids must not show through
    assert tables.gather([c, a]).tolist() == [[3], [7]]
    assert tables.gather([b, c]).tolist() == [[9, 2], [3, 0]]  # b returns: written in full
    assert tables.gather([]).shape == (0, 0)


def test_tables_grow_past_their_first_size():
    tables = BlockTables()
    seqs = [_seq(str(i), list(range(i, i + 1 + i % 5))) for i in range(40)]
    assert tables.gather(seqs[:3]).tolist() == [[0, 0, 0], [1, 2, 0], [2, 3, 4]]
    got = tables.gather(seqs)
    assert got.shape == (40, 5)
    assert got.tolist() == [s.block_ids + [0] * (5 - len(s.block_ids)) for s in seqs]


def test_a_table_grown_under_inference_mode_is_written_outside_it():
    tables = BlockTables()
    a = _seq("a", [1, 2])
    with torch.inference_mode():
        assert tables.gather([a]).tolist() == [[1, 2]]
    a.block_ids.append(3)
    assert tables.gather([a]).tolist() == [[1, 2, 3]]
