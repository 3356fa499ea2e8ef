"""FreeRuns: exact runs after taking and returning ids, merging, and the take policy."""
from qwenvl_pd.engine.free_runs import FreeRuns


def test_returned_ids_merge_with_both_neighbours():
    runs = FreeRuns(10)
    assert runs.take(10) == list(range(10))
    runs.add([2, 3])
    runs.add([6])
    assert (runs.runs(), runs.count) == ([(2, 2), (6, 1)], 3)
    runs.add([5, 4])  # joins 2..3 on the left and 6 on the right
    assert runs.runs() == [(2, 5)]
    runs.add([0, 9, 1, 8, 7])  # any order: each stretch of consecutive ids merges whole
    assert (runs.runs(), runs.count) == ([(0, 10)], 10)


def test_take_cuts_the_lowest_fitting_run_else_longest_runs_first():
    runs = FreeRuns(16)
    runs.take(16)
    runs.add([1, 2, 4, 5, 6, 7, 9, 12, 13, 14])  # runs 1..2, 4..7, 9, 12..14
    assert runs.take(3) == [4, 5, 6]
    assert runs.runs() == [(1, 2), (7, 1), (9, 1), (12, 3)]
    assert runs.take(5) == [12, 13, 14, 1, 2]  # none fits: 12..14 whole, then the longer 1..2
    assert runs.take(2) == [7, 9]  # two single ids: the lower first
    assert (runs.runs(), runs.count) == ([], 0)


def test_take_id_only_at_the_start_of_a_run():
    runs = FreeRuns(8)
    runs.take(8)
    runs.add([3, 4, 5])
    assert not runs.take_id(4) and not runs.take_id(7)
    assert runs.take_id(3)
    assert runs.runs() == [(4, 2)]


def test_a_one_block_region():
    runs = FreeRuns(1)
    assert runs.take(1) == [0] and runs.take(0) == []
    runs.add([0])
    assert runs.runs() == [(0, 1)]
