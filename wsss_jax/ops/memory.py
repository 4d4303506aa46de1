"""Device-side FIFO memory banks with a fixed capacity (CSRM per-class queues, FBR NROIs,
SPML's previous-batch prototypes).

A bank is a pytree, so it lives in the train state's `extra` and is checkpointed with it.
`items` is any pytree of arrays sharing a leading capacity axis Q (features, and labels or
image tags next to them); `ptr` is the slot the next item goes to; `count` how many slots
are filled. Slots fill in order 0, 1, ..., Q-1 and then wrap, so the filled slots are
always `[0, count)`.

Enqueue reproduces the reference "append every masked key, keep the newest Q" without
dynamic shapes (METHODS.md §7.1): each masked key's rank from the end is a reverse
cumulative sum; keys with rank >= Q are dropped; the rest are scattered to
`(ptr + offset) % Q` with distinct indices (XLA leaves the order of duplicate scatter
writes undefined), and dropped keys go to an out-of-range index that the scatter drops.

Per-class banks are the same functions under `jax.vmap` over a leading class axis.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class FifoBank(NamedTuple):
  """items: pytree of [Q, ...] arrays; ptr: int32 [] next slot; count: int32 [] filled."""
  items: PyTree
  ptr: jax.Array
  count: jax.Array


def capacity(bank: FifoBank) -> int:
  """Q, the number of slots (static)."""
  return jax.tree.leaves(bank.items)[0].shape[0]


def fifo_init(capacity: int, example_items: PyTree) -> FifoBank:
  """An empty bank whose slots are shaped like one item of `example_items`.

  Args:
    capacity: Q > 0.
    example_items: pytree of arrays (or ShapeDtypeStructs) shaped like ONE item, e.g.
      `jnp.zeros((256,), jnp.float32)` for 256-d features.

  Returns:
    FifoBank with zero items [Q, ...], ptr = count = 0.
  """
  if capacity <= 0:
    raise ValueError(f"memory bank capacity must be > 0, got {capacity}")
  items = jax.tree.map(lambda x: jnp.zeros((capacity,) + tuple(x.shape), x.dtype),
                       example_items)
  return FifoBank(items, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def fifo_enqueue(bank: FifoBank, new_items: PyTree, mask: jax.Array) -> FifoBank:
  """Appends the masked items in order; keeps the newest `min(#masked, Q)` of them.

  Args:
    bank: FifoBank with items [Q, ...].
    new_items: pytree matching `bank.items` with leading axis M instead of Q.
    mask: [M] bool; only True items are enqueued (in their order along M).

  Returns:
    The updated bank. When more than Q items are masked only the last Q survive, and the
    oldest of those lands at the old `ptr` (so FIFO order across calls is preserved).
  """
  q = capacity(bank)
  mask = mask.astype(bool)
  m = mask.astype(jnp.int32)
  # rank_from_end = number of masked items strictly after this one.
  rank_from_end = jnp.cumsum(m[::-1])[::-1] - m
  total = jnp.sum(m)
  kept = jnp.minimum(total, q)
  keep = mask & (rank_from_end < q)
  offset = kept - 1 - rank_from_end          # 0 for the oldest kept item
  index = jnp.where(keep, (bank.ptr + offset) % q, q)  # q is out of range: dropped
  items = jax.tree.map(
      lambda slots, new: slots.at[index].set(new.astype(slots.dtype), mode="drop",
                                             unique_indices=False),
      bank.items, new_items)
  return FifoBank(items, ((bank.ptr + kept) % q).astype(jnp.int32),
                  jnp.minimum(bank.count + kept, q).astype(jnp.int32))


def fifo_valid(bank: FifoBank) -> jax.Array:
  """[Q] bool: which slots hold an enqueued item."""
  return jnp.arange(capacity(bank)) < bank.count


def fifo_sample(bank: FifoBank, key: jax.Array, n: int) -> tuple[PyTree, jax.Array]:
  """`n` items drawn uniformly with replacement from the filled slots.

  Returns:
    (items pytree with leading axis n, ok: bool [] — False when the bank is empty, in which
    case the items are slot 0's zeros and must be masked out by the caller).
  """
  idx = jax.random.randint(key, (n,), 0, jnp.maximum(bank.count, 1))
  return jax.tree.map(lambda slots: slots[idx], bank.items), bank.count > 0


def fifo_ordered(bank: FifoBank) -> tuple[PyTree, jax.Array]:
  """Items from oldest to newest with their validity (for tests and inspection).

  Returns:
    (items rolled so that index 0 is the oldest filled slot, valid [Q] bool — the valid
    entries come last when the bank is not yet full).
  """
  q = capacity(bank)
  # Full: ptr is the oldest slot. Not full: ptr == count, so the walk from ptr passes the
  # empty slots [count, Q) first and then the filled ones [0, count) oldest-first.
  order = (bank.ptr + jnp.arange(q)) % q
  return (jax.tree.map(lambda slots: slots[order], bank.items),
          jnp.arange(q) >= q - bank.count)
