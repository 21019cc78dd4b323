import numpy as np
import pytest
import torch

from lmmem.data.batching import StreamBatcher
from lmmem.errors import DataError
from lmmem.output_layers.base import IGNORE_INDEX


def _collect(b: StreamBatcher):
    xs = [b.batch(j) for j in range(len(b))]
    return torch.cat([x.inputs for x in xs], 1), torch.cat([x.targets for x in xs], 1)


@pytest.mark.parametrize("n,batch,bptt", [(101, 4, 7), (50, 3, 5), (37, 1, 8), (64, 8, 64)])
def test_targets_are_inputs_shifted_by_one(n, batch, bptt):
    tokens = np.random.default_rng().integers(0, 1000, size=n).astype("<u4")
    x, y = _collect(StreamBatcher(tokens, batch, bptt))
    row_len = (n - 1) // batch
    assert x.shape == (batch, row_len)
    for r in range(batch):  # each row is a contiguous stretch of the stream, target = next token
        start = r * row_len
        assert x[r].tolist() == tokens[start : start + row_len].tolist()
        assert y[r].tolist() == tokens[start + 1 : start + row_len + 1].tolist()


@pytest.mark.parametrize("n,batch,bptt", [(101, 4, 7), (50, 3, 5), (10, 8, 3)])
def test_padded_stream_scores_every_position_once(n, batch, bptt):
    tokens = np.random.default_rng().permutation(n).astype("<u4")  # distinct ids: positions are identifiable
    b = StreamBatcher(tokens, batch, bptt, pad=True)
    x, y = _collect(b)
    valid = y != IGNORE_INDEX
    assert int(valid.sum()) == n - 1 == sum(b.batch(j).num_targets for j in range(len(b)))
    pairs = sorted(zip(x[valid].tolist(), y[valid].tolist()))
    assert pairs == sorted(zip(tokens[:-1].tolist(), tokens[1:].tolist()))


def test_ranks_partition_the_global_batch():
    tokens = np.arange(403, dtype="<u4")
    full_x, full_y = _collect(StreamBatcher(tokens, 6, 9))
    parts = [_collect(StreamBatcher(tokens, 6, 9, rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_bad_batch_sizes_name_the_fix():
    with pytest.raises(DataError, match="divisible"):
        StreamBatcher(np.arange(100, dtype="<u4"), 5, 4, world_size=2)
    with pytest.raises(DataError, match="too few"):
        StreamBatcher(np.arange(5, dtype="<u4"), 8, 4)
