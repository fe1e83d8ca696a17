"""Packing: several samples per row, without any sample seeing another.

Each packed row concatenates whole samples (first-fit decreasing into rows of `cutoff_len` tokens, so
the layout is deterministic) and carries `position_ids` that restart at 0 for every sample. The model
then gets no 2-D attention mask: transformers derives a block-diagonal causal mask from the restarting
position ids (SDPA and eager on CPU, varlen kernels with flash-attention), so attention never crosses
a sample boundary and each sample's loss equals its unpacked loss.

The layout is computed from the samples' lengths alone (a memory-mapped cache answers them from its
offsets) and kept as two index arrays; a row's tokens are read from its samples when the row is
read. So packing a dataset larger than memory costs 8 bytes per sample and reads no token.
"""

import numpy as np

from dist_glm.data.batching import Example, sample_lengths
from dist_glm.data.template import IGNORE_INDEX


def first_fit_rows(lengths: list[int], order: list[int], capacity: int) -> list[int]:
    """The row of each sample of `order` under first fit: the lowest-numbered row with room for it.

    A max-tree over the rows' free room finds that row in O(log n) steps (a scan of every open row
    would be quadratic: hours for a million samples). Rows not opened yet have the whole capacity, so
    when no open row fits, the leftmost row with room is the next new one, as first fit wants. A
    sample longer than a row gets a new row of its own."""
    size = 1 << max(0, (len(order) - 1).bit_length())
    room = [capacity] * (2 * size)  # room[size + r]: free tokens of row r; room[k]: max of k's subtree
    rows, opened = [], 0
    for i in order:
        n = lengths[i]
        if room[1] >= n:
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= n else 2 * node + 1
        else:
            node = size + opened
        rows.append(node - size)
        opened = max(opened, node - size + 1)
        room[node] -= n
        node //= 2
        while node:
            best = max(room[2 * node], room[2 * node + 1])
            if room[node] == best:
                break  # nothing above changes either
            room[node] = best
            node //= 2
    return rows


class PackedRows:
    """The packed rows of a sequence of examples: `members[offsets[r]:offsets[r + 1]]` are the samples
    of row r, in the order they were placed. Indexing builds the row (a sequence of Example)."""

    def __init__(self, examples, members: np.ndarray, offsets: np.ndarray, row_lengths: np.ndarray):
        self.examples, self.members, self.offsets, self.row_lengths = examples, members, offsets, row_lengths

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[j] for j in range(*r.indices(len(self)))]
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        ids, labels, positions = [], [], []
        for i in self.members[self.offsets[r] : self.offsets[r + 1]].tolist():
            e = self.examples[i]
            ids += e.input_ids
            # The first token of a sample is never a target: the token before it belongs to another sample.
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += list(range(len(e.input_ids)))
        return Example(ids, labels, [], "", position_ids=positions)

    def lengths(self) -> list[int]:
        return self.row_lengths.tolist()

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    def __add__(self, other):
        return list(self) + list(other)


def pack_examples(examples, capacity: int) -> PackedRows:
    lengths = np.asarray(sample_lengths(examples), dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in file order
    rows = np.asarray(first_fit_rows(lengths.tolist(), order.tolist(), capacity), dtype=np.int64)
    # Stable: within a row, samples keep the order they were placed in.
    members = order[np.argsort(rows, kind="stable")]
    counts = np.bincount(rows, minlength=0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    row_lengths = np.bincount(rows, weights=lengths[order], minlength=len(counts)).astype(np.int64)
    return PackedRows(examples, members, offsets, row_lengths)
