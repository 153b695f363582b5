"""The Batch every stage of the loop passes on (grpo_cli/batch.py): packing, positions, the
target mask, selecting rows, micro-batches, totals and moving to a device. Hand-made tensors only."""

import pytest
import torch

from grpo_cli.batch import Batch, pack, position_ids

PAD = 0


def packed():
    # prompts [1, 2] and [3]; completions [4] and [5, 6, 7]: lengths 3 and 4, so T = 4 and the
    # first row gets one column of left padding
    return pack([[1, 2], [3]], [[4], [5, 6, 7]], PAD)


def batch_of(n: int) -> Batch:
    """n rows: row i is prompt [10 + i], completion [20 + i] * (i % 3 + 1); texts, group, rewards and
    an algorithm tensor all carry the row index so a mixed-up row shows."""
    ids, attn, comp = pack([[10 + i] for i in range(n)], [[20 + i] * (i % 3 + 1) for i in range(n)], PAD)
    batch = Batch(
        ids,
        attn,
        comp,
        [f"p{i}" for i in range(n)],
        [f"c{i}" for i in range(n)],
        [str(i) for i in range(n)],
        torch.arange(n) // 2,
        rewards=torch.arange(n, dtype=torch.float32),
    )
    batch.tensors["advantages"] = torch.arange(n, dtype=torch.float32)[:, None].expand(-1, ids.shape[1] - 1).clone()
    return batch


def test_pack_left_pads_and_marks_the_completion_tokens():
    ids, attn, comp = packed()
    assert ids.tolist() == [[PAD, 1, 2, 4], [3, 5, 6, 7]]
    assert attn.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert comp.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert ids.dtype == attn.dtype == comp.dtype == torch.long


def test_position_ids_count_from_each_rows_first_real_token():
    _, attn, _ = packed()
    # row 0: cumsum [0, 1, 2, 3] - 1 = [-1, 0, 1, 2], the padding clamped to 0; row 1: 0..3
    assert position_ids(attn).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]


def test_target_mask_is_the_completion_mask_shifted_by_one_and_totals_count_it():
    ids, attn, comp = packed()
    batch = Batch(ids, attn, comp, ["a", "b"], ["x", "y"], ["1", "2"], torch.tensor([0, 0]))
    # position t predicts token t + 1: completion_mask[:, 1:] = [[0, 0, 1], [1, 1, 1]]
    assert batch.target_mask.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert batch.target_mask.dtype == torch.float32
    assert len(batch) == 2
    assert batch.with_totals() is batch and batch.totals == {"sequences": 2.0, "tokens": 4.0}  # 1 + 3 targets
    # no completion token at all: tokens is clamped to 1 so a per-token loss never divides by 0
    empty = Batch(ids, attn, torch.zeros_like(comp), ["a", "b"], ["", ""], ["1", "2"], torch.tensor([0, 0]))
    assert empty.with_totals().totals["tokens"] == 1.0


def test_select_picks_every_per_row_field_in_the_given_order():
    batch = batch_of(5).with_totals()
    batch.totals["temperature"] = 0.7
    picked = batch.select([3, 0])
    assert len(picked) == 2
    assert torch.equal(picked.input_ids, batch.input_ids[[3, 0]])
    assert torch.equal(picked.attention_mask, batch.attention_mask[[3, 0]])
    assert torch.equal(picked.completion_mask, batch.completion_mask[[3, 0]])
    assert picked.prompts == ["p3", "p0"] and picked.completions == ["c3", "c0"] and picked.answers == ["3", "0"]
    assert picked.group.tolist() == [1, 0]  # arange(5) // 2 = [0, 0, 1, 1, 2]
    assert picked.rewards.tolist() == [3.0, 0.0]
    assert picked.tensors["advantages"][:, 0].tolist() == [3.0, 0.0]
    # the whole batch's totals (a micro-batch normalises like the full batch), as a copy
    assert picked.totals == batch.totals
    picked.totals["sequences"] = 99.0
    assert batch.totals["sequences"] == 5.0
    # the original is untouched
    assert batch.prompts == [f"p{i}" for i in range(5)] and len(batch) == 5
    no_rewards = Batch(
        batch.input_ids,
        batch.attention_mask,
        batch.completion_mask,
        batch.prompts,
        batch.completions,
        batch.answers,
        batch.group,
    )
    assert no_rewards.select([1]).rewards is None


@pytest.mark.parametrize(
    "n, rows, sizes",
    [
        (5, 2, [3, 2]),  # ceil(5 / 2) = 3 rows each: [0, 1, 2], [3, 4]
        (6, 3, [2, 2, 2]),  # ceil(6 / 3) = 2
        (8, 2, [4, 4]),  # groups of 2 stay together: 8 is a multiple of 2 * 2
        (3, 1, [3]),
    ],
)
def test_micro_batches_are_contiguous_splits_that_cover_the_batch(n, rows, sizes):
    batch = batch_of(n).with_totals()
    parts = batch.micro_batches(rows)
    assert [len(p) for p in parts] == sizes
    # concatenated back in order they are the batch, every field
    assert sum((p.prompts for p in parts), []) == batch.prompts
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert torch.equal(torch.cat([p.rewards for p in parts]), batch.rewards)
    assert torch.equal(torch.cat([p.tensors["advantages"] for p in parts]), batch.tensors["advantages"])
    assert all(p.totals == {"sequences": float(n), "tokens": batch.totals["tokens"]} for p in parts)
    if n == 8:  # no group is split over two micro-batches
        assert all(not set(a.group.tolist()) & set(b.group.tolist()) for a, b in zip(parts, parts[1:]))


def test_to_moves_every_tensor_and_leaves_the_source_batch_where_it_was():
    batch = batch_of(3)
    moved = batch.to(torch.device("meta"))  # a device every machine has: tensors without storage
    tensors = [
        moved.input_ids,
        moved.attention_mask,
        moved.completion_mask,
        moved.group,
        moved.rewards,
        *moved.tensors.values(),
    ]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.input_ids.shape == batch.input_ids.shape and moved.tensors["advantages"].shape == (
        3,
        batch.input_ids.shape[1] - 1,
    )
    assert moved.prompts == batch.prompts and moved.answers == batch.answers
    assert batch.input_ids.device.type == "cpu" and batch.tensors["advantages"].device.type == "cpu"
    bare = Batch(
        batch.input_ids,
        batch.attention_mask,
        batch.completion_mask,
        batch.prompts,
        batch.completions,
        batch.answers,
        batch.group,
    )
    assert bare.to(torch.device("meta")).rewards is None
