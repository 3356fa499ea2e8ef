"""Decode rows' block tables as rows of one tensor that persists from step to step."""
from dataclasses import dataclass

import torch

from qwenvl_pd.engine.sequence import Sequence


@dataclass
class _Row:
    index: int
    ids: list[int]  # the block list this row mirrors (a new list means a new occupant)
    synced: int     # leading entries of ids already written (and the extent to clear on reuse)


class BlockTables:
    """A step writes only the block ids its sequences gained since the previous step, so its
    tables cost O(batch) plus the new ids rather than every sequence's whole block list."""

    def __init__(self):
        self._table = torch.zeros(0, 0, dtype=torch.long)
        self._rows: dict[Sequence, _Row] = {}  # the sequences of the previous call
        self._spare: list[_Row] = []

    def gather(self, seqs: list[Sequence]) -> torch.Tensor:
        """[len(seqs), widest] block ids of seqs, padded with 0. Rows of sequences missing from
        this call are reused: a sequence that returns later is written again in full."""
        width = max((len(s.block_ids) for s in seqs), default=0)
        self._reserve(len(self._rows) + len(seqs), width)
        previous, self._rows = self._rows, {}
        indices = []
        for s in seqs:
            row = previous.pop(s, None) or self._spare.pop()
            self._sync(row, s.block_ids)
            self._rows[s] = row
            indices.append(row.index)
        self._spare.extend(previous.values())
        return self._table[torch.tensor(indices, dtype=torch.long), :width]

    def _sync(self, row: _Row, ids: list[int]) -> None:
        if row.ids is not ids or len(ids) < row.synced:
            self._table[row.index, :row.synced] = 0  # what another list left there
            row.ids, row.synced = ids, 0
        if len(ids) > row.synced:
            self._table[row.index, row.synced:len(ids)] = torch.tensor(ids[row.synced:], dtype=torch.long)
            row.synced = len(ids)

    def _reserve(self, rows: int, width: int) -> None:
        """Room for `rows` rows in use at once and `width` ids a row, grown by doubling."""
        have_rows, have_width = self._table.shape
        if rows <= have_rows and width <= have_width:
            return
        rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        width = have_width if width <= have_width else max(width, 2 * have_width)
        # a normal tensor even when called under inference_mode, so that steps prepared outside
        # it can still write into the table
        with torch.inference_mode(False):
            grown = torch.zeros(rows, width, dtype=torch.long)
            grown[:have_rows, :have_width] = self._table
        self._spare.extend(_Row(i, [], 0) for i in range(have_rows, grown.shape[0]))
        self._table = grown
