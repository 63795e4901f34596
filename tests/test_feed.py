"""common/feed.py: every rank gets a disjoint shard of each epoch's shuffle, a resumed epoch
continues with the very batches an uninterrupted one would have had, and the augmentation
generator is a pure function of (seed, rank, step)."""

import pytest
import torch

from common import dist
from common.cli import ConfigError
from common.feed import BatchFeed, step_generator


def _images(n):  # image i holds the value i: a batch names the images it holds
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 3).contiguous()


def _ids(batch):
    return batch[:, 0, 0, 0].tolist()


def test_ranks_get_disjoint_shards_covering_the_epoch(monkeypatch):
    seen = []
    for rank in range(4):
        monkeypatch.setattr(dist, "get_world_size", lambda: 4)
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        feed = BatchFeed(_images(100), global_batch=20, device=torch.device("cpu"), seed=0)
        assert feed.steps_per_epoch == 5 and feed.local_batch == 5
        seen.append([i for b in feed.epoch(3) for i in _ids(b)])
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == 100  # disjoint, and every image once
    assert seen[0] != sorted(seen[0])  # shuffled


def test_a_resumed_epoch_continues_with_the_same_batches():
    feed = BatchFeed(_images(64), 8, torch.device("cpu"), seed=1)
    whole = [_ids(b) for b in feed.epoch(2)]
    assert [_ids(b) for b in feed.epoch(2, start_step=5)] == whole[5:]
    assert [_ids(b) for b in feed.epoch(3)] != whole  # another epoch, another order


def test_a_batch_larger_than_the_data_is_refused():
    with pytest.raises(ConfigError, match="larger than the training set"):
        BatchFeed(_images(10), 16, torch.device("cpu"), seed=0)


def test_step_generator_is_a_pure_function_of_seed_rank_and_step():
    def draw(*key):
        return torch.rand(4, generator=step_generator(*key))

    assert torch.equal(draw(0, 1, 7), draw(0, 1, 7))
    streams = [draw(0, 0, 7), draw(0, 1, 7), draw(0, 0, 8), draw(1, 0, 7)]
    for i in range(len(streams)):
        for j in range(i):
            assert not torch.equal(streams[i], streams[j])
    draw(2**63 - 1, 7, 10**9)  # any valid seed, rank and step is in the generator's range
