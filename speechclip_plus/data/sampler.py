"""Resumable, distributed batch sampler, length-bucketed or uniformly shuffled.

Global batches (what one optimiser step sees over all R = ``num_replicas`` ranks) are built per epoch:

1. ``bucketing=False``: the utterances in a uniform random order (``shuffle``; the reference's
   ``DataLoader(shuffle=True)``) or in index order. ``bucketing=True``: order the utterances by duration
   (stable); with ``shuffle``, cut that order into buckets of ``bucket_batches`` x G utterances
   (G = ``batch_size`` x R), shuffle inside each bucket and shuffle the bucket order. Randomness comes from
   ``numpy.random.default_rng(seed + epoch)``;
2. walk the sequence greedily: a batch takes utterances while n <= G and, if ``max_batch_seconds`` = S is
   given, padded seconds n x max(duration) <= S x R; a full batch is cut to a multiple of R (the rest
   starts the next one). A batch of exactly R utterances may exceed S (one utterance longer than S per
   rank must still go somewhere);
3. the last, incomplete batch is dropped (``drop_last``) or else padded to a multiple of R with the first
   utterances of the sequence (so with ``drop_last=False`` and R > 1 a few utterances repeat);
4. with ``shuffle`` the batch order is shuffled by the same generator.

Rank r takes ``batch[r::R]`` of every global batch: every rank has the same number of batches and the same
local size per step, and the ranks' slices of a step are disjoint with the global batch as union. Without
``max_batch_seconds`` the global batches equal those of a single-process sampler with batch size G and the
same seed; with it they equal those of ``batch_size=G, max_batch_seconds=S*R`` except for the cut to a
multiple of R.

Resume: ``state_dict(position)`` records the epoch and the index of the next batch; after
``load_state_dict`` the next ``__iter__`` starts at that batch. ``set_epoch(e)`` with a different epoch
restarts at batch 0.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class LengthBucketSampler(Sampler):
    def __init__(
        self,
        durations: Sequence[float],
        batch_size: int,
        max_batch_seconds: Optional[float] = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        bucket_batches: int = 50,
        bucketing: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank}, num_replicas {num_replicas}")
        if max_batch_seconds is not None and max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be > 0, got {max_batch_seconds}")
        if bucket_batches < 1:
            raise ValueError(f"bucket_batches must be >= 1, got {bucket_batches}")
        d = np.asarray(durations, dtype=np.float64).reshape(-1)
        if d.size and (not np.all(np.isfinite(d)) or d.min() < 0):
            bad = int(np.flatnonzero(~np.isfinite(d) | (d < 0))[0])
            raise ValueError(f"durations[{bad}] = {d[bad]} is not a finite non-negative number")
        self.durations = d
        self.batch_size = int(batch_size)
        self.max_batch_seconds = max_batch_seconds
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.bucket_batches = int(bucket_batches)
        self.bucketing = bool(bucketing)
        self.epoch = 0
        self._position = 0  # index of the next batch of the current epoch
        self._cache: Optional[tuple] = None

    # ------------------------------------------------------------------ batch construction
    def global_batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """The epoch's global batches (lists of dataset indices, before the per-rank split)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        R = self.num_replicas
        G = self.batch_size * R
        S = None if self.max_batch_seconds is None else float(self.max_batch_seconds) * R
        d = self.durations
        rng = np.random.default_rng(self.seed + epoch) if self.shuffle else None
        if not self.bucketing:
            order = rng.permutation(len(d)) if rng is not None else np.arange(len(d))
        else:
            order = np.argsort(d, kind="stable")
            if rng is not None:
                size = G * self.bucket_batches
                buckets = [rng.permutation(order[i : i + size]) for i in range(0, len(order), size)]
                order = np.concatenate([buckets[k] for k in rng.permutation(len(buckets))]) if buckets else order
        seq = order.tolist()

        batches: List[List[int]] = []
        cur: List[int] = []
        longest = 0.0
        for i in seq:
            if len(cur) >= R:
                n, m = len(cur) + 1, max(longest, d[i])
                if n > G or (S is not None and n * m > S):
                    keep = len(cur) - len(cur) % R
                    batches.append(cur[:keep])
                    cur = cur[keep:]
                    longest = max((d[j] for j in cur), default=0.0)
            cur.append(i)
            longest = max(longest, d[i])
            if len(cur) == G:  # full by count: close now (so a full last batch is never dropped)
                batches.append(cur)
                cur, longest = [], 0.0
        if cur:
            if not self.drop_last:
                k = 0
                while len(cur) % R:
                    cur.append(seq[k % len(seq)])
                    k += 1
                batches.append(cur)
        if rng is not None:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if not batches and len(seq):
            log.warning("LengthBucketSampler: %d utterance(s) make no complete batch of %d (drop_last)",
                        len(seq), G)
        self._cache = (epoch, batches)
        return batches

    def batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """This rank's batches of the epoch: ``global_batch[rank::num_replicas]`` for each step."""
        return [b[self.rank :: self.num_replicas] for b in self.global_batches(epoch)]

    # ------------------------------------------------------------------ Sampler protocol
    def __iter__(self) -> Iterator[List[int]]:
        batches = self.batches()
        start = self._position if self._position < len(batches) else 0  # a finished epoch runs again
        for k in range(start, len(batches)):
            self._position = k + 1
            yield batches[k]

    def __len__(self) -> int:
        return len(self.global_batches())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); a new epoch starts at its first batch."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._position = 0

    # ------------------------------------------------------------------ resume
    def state_dict(self, position: Optional[int] = None) -> Dict[str, Any]:
        """``{"epoch", "position", ...}``; ``position`` = batches of this epoch already consumed.

        Without ``position`` it is the number of batches this sampler has handed out, which a
        ``DataLoader`` that prefetches runs ahead of: pass the count of batches actually trained on. A
        finished epoch is recorded as position 0 of the next one.
        """
        pos = self._position if position is None else int(position)
        n = len(self)
        if not 0 <= pos <= n:
            raise ValueError(f"position {pos} outside the epoch's {n} batches")
        epoch = self.epoch
        if n and pos == n:
            epoch, pos = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": pos,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "max_batch_seconds": self.max_batch_seconds,
            "num_utts": int(self.durations.size),
            "bucketing": self.bucketing,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue where ``state`` was saved; the batching settings must match."""
        for key in ("seed", "num_replicas", "batch_size", "max_batch_seconds", "num_utts", "bucketing"):
            mine = self.durations.size if key == "num_utts" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this sampler has {mine}: "
                                 "resuming would not continue the same batches")
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        n = len(self)
        if not 0 <= self._position <= n:
            raise ValueError(f"sampler state position {self._position} outside the epoch's {n} batches")
