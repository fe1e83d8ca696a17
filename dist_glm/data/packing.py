"""Packing: several samples per row, without any sample seeing another.

Each packed row concatenates whole samples (first-fit decreasing into rows of `cutoff_len` tokens, so
the layout is deterministic) and carries `position_ids` that restart at 0 for every sample. The model
then gets no 2-D attention mask: transformers derives a block-diagonal causal mask from the restarting
position ids (SDPA and eager on CPU, varlen kernels with flash-attention), so attention never crosses
a sample boundary and each sample's loss equals its unpacked loss.
"""

from dist_glm.data.batching import Example, sample_lengths
from dist_glm.data.template import IGNORE_INDEX


def pack_examples(examples: list[Example], capacity: int) -> list[Example]:
    lengths = sample_lengths(examples)
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    packed = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            e = examples[i]
            ids += e.input_ids
            # The first token of a sample is never a target: the token before it belongs to another sample.
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += list(range(len(e.input_ids)))
        packed.append(Example(ids, labels, [], "", position_ids=positions))
    return packed
