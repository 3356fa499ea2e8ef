"""Which layers and blocks decode reads for each layer-wise progress report: exact reads, each
(layer, block) once and only once final."""
import pytest

from qwenvl_pd.kv_transfer.cursor import Read, ReadCursor


def test_reads_follow_the_chunks_and_the_last_partial_block_waits_for_the_whole_prompt():
    c = ReadCursor(num_layers=4, block_size=16, prompt_len=40, num_blocks=3)
    assert c.advance(0, 0, 4) == []                       # the announce: nothing final yet
    assert c.advance(0, 20, 2) == [Read(range(0, 2), 0, 1)]   # chunk [0, 20) in layers 0-1: block 0
    assert c.advance(20, 20, 4) == [Read(range(2, 4), 0, 1)]  # block 1 still partly unwritten
    assert c.advance(20, 40, 2) == [Read(range(0, 2), 1, 3)]  # the prompt's end: the last block too
    assert not c.complete
    assert c.advance(40, 40, 4) == [Read(range(2, 4), 1, 3)]
    assert c.complete and c.done == [3, 3, 3, 3]


def test_a_late_reader_reads_everything_in_one_read_and_stale_reports_read_nothing():
    c = ReadCursor(num_layers=2, block_size=16, prompt_len=33, num_blocks=3)
    assert c.advance(33, 33, 2) == [Read(range(0, 2), 0, 3)]
    assert c.advance(16, 32, 1) == [] and c.complete


def test_layers_needing_different_blocks_are_separate_reads():
    c = ReadCursor(num_layers=3, block_size=4, prompt_len=16, num_blocks=4)
    assert c.advance(4, 12, 1) == [Read(range(0, 1), 0, 3), Read(range(1, 3), 0, 1)]
    assert c.advance(4, 12, 3) == [Read(range(1, 3), 1, 3)]


def test_too_few_blocks_for_the_prompt_is_refused():
    with pytest.raises(ValueError, match="cannot hold 40 tokens"):
        ReadCursor(2, 16, 40, 2)
