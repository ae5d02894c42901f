"""Deterministic distributed batching: which examples each rank sees at each optimizer step.

Two ways to cut a step's global batch, both pure functions of (seed, epoch,
global step), so a resumed run sees exactly the batches of an uninterrupted one:

- by count (default): with per-rank micro-batch sizes m_r (all equal to
  train.micro_batch_size unless data.micro_batch_sizes says otherwise) the global
  batch is G = grad_accum_steps x sum(m_r) examples; step s of an epoch takes
  positions [s*G, (s+1)*G) of the epoch's permutation, rank r its contiguous
  part, cut into grad_accum_steps micro-batches of m_r. It does not depend on the
  number of ranks, only on G. A smaller GPU can take a smaller m_r while every
  rank still runs grad_accum_steps micro-steps (fewer would hang FSDP).
- by token budget (data.token_budget): the epoch's permutation is cut, in
  length-sorted windows, into micro-batches whose padded size (examples x
  longest, rounded up to 8) stays within the budget, and each step deals
  world_size x grad_accum_steps of them out to the ranks in order, so every
  rank processes nearly the same number of tokens.

Preference data is a sequence of Pair items: the sampler deals pairs (a micro-batch size counts pairs), so a
pair is never split across micro-batches or ranks, and `collate` lays a micro-batch out as rows [chosen...,
rejected...] (one forward, as TRL does); under a token budget a pair costs two padded rows.

With per-rank shares (data.balance: a list of weights, or `speed`: measured and re-measured during the run), a
step's global batch is the by-count one, the same examples in the same order; only the cut between ranks moves:
contiguous parts whose input tokens follow the shares (`split_by_shares`), each rank still cut into
grad_accum_steps micro-batches (of different sizes across ranks). Losses are normalised over the global batch, so
the split changes no step's arithmetic beyond float rounding.

The last incomplete global batch of an epoch is dropped by default; with
drop_last=false it is completed from the start of the epoch's order, so no rank
ever runs fewer micro-steps than another.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.errors import UserError
from ..dist.plan import per_rank
from .encode import IGNORE, Example, Feedback, Pair

PAD_MULTIPLE = 8
HOST_ONLY = ("n_tokens", "row_targets")  # counts read on the host, never given to the model (to_device)
SORT_WINDOW = 2048  # token budget: examples sorted by length together before cutting micro-batches


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return math.ceil(n / multiple) * multiple


@dataclass
class StepSampler:
    n_examples: int
    world_size: int
    rank: int
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    shuffle: bool = True
    drop_last: bool = True
    rank_batch_sizes: Optional[list[int]] = None  # micro-batch size of every rank (None: all micro_batch_size)
    token_budget: Optional[int] = None  # cut micro-batches by padded tokens instead of by count
    lengths: Optional[Sequence[int]] = None  # example lengths, needed with token_budget
    rows_per_item: int = 1  # token budget: padded rows an item costs (2 for a preference pair)
    shares: Optional[list[float]] = None  # by count: each rank's share of a step's tokens (None: equal counts)
    step: int = 0  # next global step to fetch (state for checkpoints)
    _plans: dict = field(default_factory=dict, repr=False)  # token budget: one epoch's micro-batches
    _epoch_steps: dict = field(default_factory=dict, repr=False)  # token budget: steps of each epoch seen

    def __post_init__(self) -> None:
        if self.rank_batch_sizes is None:
            self.rank_batch_sizes = [self.micro_batch_size] * self.world_size
        if len(self.rank_batch_sizes) != self.world_size:
            raise UserError(f"data.micro_batch_sizes: {len(self.rank_batch_sizes)} sizes for {self.world_size} ranks")
        if (self.token_budget is not None or self.shares is not None) and self.lengths is None:
            raise ValueError("token_budget and shares need the example lengths")
        if self.steps_in_epoch(0) == 0:
            what = (f"micro-batches of {self.token_budget} tokens (data.token_budget) x {self.grad_accum_steps} "
                    f"accumulation x {self.world_size} ranks" if self.token_budget else
                    f"one global batch of {self.global_batch} (micro-batch sizes {self.rank_batch_sizes} x "
                    f"train.grad_accum_steps {self.grad_accum_steps})")
            raise UserError(f"data: {self.n_examples} examples cannot fill {what}; lower them, add data, "
                            "or set data.drop_last=false")

    # -- by count ---------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Examples per optimizer step (by-count mode)."""
        return sum(self.rank_batch_sizes) * self.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in_epoch(0)

    def steps_in_epoch(self, epoch: int) -> int:
        if self.token_budget is None:
            n, per_step = self.n_examples, self.global_batch
            return n // per_step if self.drop_last else math.ceil(n / per_step)
        if epoch not in self._epoch_steps:
            n, per_step = len(self._plan(epoch)), self.world_size * self.grad_accum_steps
            self._epoch_steps[epoch] = n // per_step if self.drop_last else math.ceil(n / per_step)
        return self._epoch_steps[epoch]

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_examples))
        g = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
        return torch.randperm(self.n_examples, generator=g).tolist()

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        if self.token_budget is None:
            return divmod(step, self.steps_per_epoch)
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            if self.steps_in_epoch(epoch) == 0:
                raise UserError(f"data: epoch {epoch} has no complete global batch under data.token_budget; "
                                "lower the budget or set data.drop_last=false")
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def global_indices(self, step: int) -> list[int]:
        """The example indices of global step `step` (all ranks together)."""
        if self.token_budget is not None:
            return [i for mb in self._step_micro_batches(step) for i in mb]
        epoch, s = self.locate(step)
        perm = self.permutation(epoch)
        chunk = perm[s * self.global_batch:(s + 1) * self.global_batch]
        if len(chunk) < self.global_batch:  # drop_last=false: complete the batch from the epoch's start
            chunk = chunk + perm[: self.global_batch - len(chunk)]
        return chunk

    def rank_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's grad_accum_steps micro-batches (example indices) for global step `step`."""
        accum = self.grad_accum_steps
        if self.token_budget is not None:
            return self._step_micro_batches(step)[self.rank * accum:(self.rank + 1) * accum]
        if self.shares is not None:
            indices = self.global_indices(step)
            mine = split_by_shares([int(self.lengths[i]) for i in indices], self.shares, accum)[self.rank]
            return [indices[i:j] for i, j in even_cuts(mine[0], mine[1], accum)]
        sizes = self.rank_batch_sizes
        start = accum * sum(sizes[: self.rank])
        mine = self.global_indices(step)[start:start + accum * sizes[self.rank]]
        m = sizes[self.rank]
        return [mine[i * m:(i + 1) * m] for i in range(accum)]

    # -- by token budget --------------------------------------------------------------------
    def _plan(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches under the token budget (cached, one epoch at a time).

        Windows of SORT_WINDOW examples of the epoch's order are sorted by length
        and cut greedily, so a micro-batch holds examples of similar length (little
        padding, real tokens close to the budget); the micro-batches are then
        shuffled, so neither steps nor ranks drift from short to long examples.
        """
        if epoch not in self._plans:
            plan: list[list[int]] = []
            perm = self.permutation(epoch)
            cur: list[int] = []  # a window's last, underfull micro-batch moves on into the next window
            for w in range(0, len(perm), SORT_WINDOW):
                window, cur, longest = cur + perm[w:w + SORT_WINDOW], [], 0
                for i in sorted(window, key=lambda i: int(self.lengths[i])):
                    n = int(self.lengths[i])
                    if cur and padded(max(longest, n)) * self.rows_per_item * (len(cur) + 1) > self.token_budget:
                        plan.append(cur)
                        cur, longest = [], 0
                    cur.append(i)
                    longest = max(longest, n)
            if cur:
                plan.append(cur)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 10_007 + epoch + 7_919)
                plan = [plan[k] for k in torch.randperm(len(plan), generator=g).tolist()]
            self._plans = {epoch: plan}
        return self._plans[epoch]

    def _step_micro_batches(self, step: int) -> list[list[int]]:
        epoch, s = self.locate(step)
        plan = self._plan(epoch)
        k = self.world_size * self.grad_accum_steps
        chunk = plan[s * k:(s + 1) * k]
        return chunk + plan[: k - len(chunk)]  # drop_last=false: complete from the epoch's start

    # -- state ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        fp = {"n_examples": self.n_examples, "seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last}
        if self.token_budget is not None:
            fp.update(token_budget=self.token_budget, world_size=self.world_size,
                      grad_accum_steps=self.grad_accum_steps)
        else:
            fp["global_batch"] = self.global_batch
        return fp

    def state_dict(self) -> dict:
        """Where the data stands: the next global step, its epoch and position in the epoch."""
        epoch, s = self.locate(self.step)
        position = s * self.global_batch if self.token_budget is None else \
            sum(len(mb) for mb in self._plan(epoch)[: s * self.world_size * self.grad_accum_steps])
        return {"step": self.step, "epoch": epoch, "position": position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuses data or batching that changed what the steps would hold."""
        mine = self._fingerprint()
        diff = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise UserError("data: the checkpoint's data order does not match this run (" + ", ".join(diff) +
                            "); resume with the same data and batch settings")
        self.step = int(state["step"])


def split_by_shares(lengths: Sequence[int], shares: Sequence[float], accum: int) -> list[tuple[int, int]]:
    """Cut a global batch (its items' token counts, in order) into one contiguous [start, end) per rank whose tokens
    follow `shares` (any positive weights): rank r's part ends where the running token count comes closest to
    the first r+1 shares' part of the total. Every rank keeps at least `accum` items (one per micro-batch), so a
    tiny share still runs every micro-step. A pure function of its arguments: the same on every rank."""
    n, world = len(lengths), len(shares)
    prefix = [0]
    for x in lengths:
        prefix.append(prefix[-1] + x)
    total, weight = prefix[-1], sum(shares)
    cuts, start, acc = [], 0, 0.0
    for r in range(world - 1):
        acc += shares[r]
        target = total * acc / weight
        lo, hi = start + accum, n - accum * (world - 1 - r)
        end = min(range(lo, hi + 1), key=lambda k: (abs(prefix[k] - target), k))
        cuts.append((start, end))
        start = end
    cuts.append((start, n))
    return cuts


def even_cuts(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) cut into `parts` contiguous pieces whose sizes differ by at most one (the larger first)."""
    size, extra = divmod(end - start, parts)
    out, at = [], start
    for k in range(parts):
        step = size + (k < extra)
        out.append((at, at + step))
        at += step
    return out


def resolve_rank_sizes(sizes: Optional[list], world_size: int, local_world_size: int) -> Optional[list[int]]:
    """data.micro_batch_sizes: one entry per rank, or one per node (ranks of node k share entry k)."""
    if not sizes:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in sizes):
        raise UserError(f"data.micro_batch_sizes: expected positive integers, got {sizes!r}")
    return per_rank("data.micro_batch_sizes", sizes, world_size, local_world_size,
                    "one size per rank or one per node")


# ----------------------------------------------------------------------------- batches


def collate(examples: list[Example] | list[Pair] | list[Feedback], pad_id: int, multiple: int = PAD_MULTIPLE,
            flatten: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to a multiple of `multiple`; labels are shifted so labels[b, t] is the target of position t.

    Pairs become rows [chosen of each pair..., rejected of each pair...]: row i and row n + i are one pair.
    KTO examples become rows [each example..., each KL row...] and `desirable`, their tags (bool, n).

    Right padding under a causal mask never influences real tokens, so no
    attention mask is needed (the fast causal kernel path stays on). Packed rows
    add position_ids restarting at every example; `flatten` lays the rows end to
    end in one row for flash attention's varlen path and adds its boundaries
    (`flash_attn_kwargs`), so transformers need not find them on the GPU.
    """
    tags = None
    if isinstance(examples[0], Feedback):
        tags = torch.tensor([f.desirable for f in examples], dtype=torch.bool)
        examples = [f.example for f in examples] + [f.kl for f in examples]
    if isinstance(examples[0], Pair):
        examples = [p.chosen for p in examples] + [p.rejected for p in examples]
    longest = max(len(e.input_ids) for e in examples)
    width = padded(longest, multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, : n - 1] = torch.tensor(e.labels[1:n])
    n_tokens = sum(len(e.input_ids) for e in examples)
    batch = {"input_ids": ids, "labels": labels, "n_tokens": torch.tensor(n_tokens)}
    if tags is not None:
        batch["desirable"] = tags
    if any(e.seq_lens for e in examples):
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for b, e in enumerate(examples):
            at = 0
            for n in (e.seq_lens or [len(e.input_ids)]) + [width - len(e.input_ids)]:
                pos[b, at:at + n] = torch.arange(n)
                at += n
        batch["position_ids"] = pos
        if flatten:
            batch = {k: v.reshape(1, -1) if v.ndim == 2 else v for k, v in batch.items()}
            batch.update(flash_attn_kwargs([n for e in examples for n in segments(e, width)]))
    return batch


def segments(e: Example, width: int) -> list[int]:
    """The lengths of a padded row's sequences: its examples, then the padding tail (positions restart at each)."""
    lens = (e.seq_lens or [len(e.input_ids)]) + [width - len(e.input_ids)]
    return [n for n in lens if n > 0]


def flash_attn_kwargs(lengths: list[int]) -> dict:
    """Flash attention's varlen boundaries of sequences laid end to end, as transformers' DataCollatorWithFlattening
    (return_flash_attn_kwargs=True) gives them: cumulative starts (int32, the total last) and the longest length
    (a Python int). Given to the model, transformers' flash attention uses them as they are; without them it derives
    them from position_ids in every layer (a nonzero() and tensor maxima: host syncs, and graph breaks under
    compile)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    cu = torch.tensor(starts, dtype=torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def to_device(batch: dict, device: torch.device, pin: bool = False) -> dict:
    """A collated micro-batch's model inputs on `device` (HOST_ONLY counts stay on the host; the flash attention max
    lengths are Python ints and stay so). pin: through pinned memory first, for batches collated outside the
    DataLoader (evaluation): on CUDA a non_blocking copy from pageable memory is a synchronous one."""
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k not in HOST_ONLY}


def context_chunk(batch: dict[str, torch.Tensor], lengths: list[int], size: int, index: int
                  ) -> dict[str, torch.Tensor]:
    """Context parallelism: chunk `index` of `size` of every row of a collated micro-batch (its width a multiple of
    `size`). input_ids, labels and position_ids are cut to the chunk (labels were shifted before the cut, so a
    chunk's last label is the first token of the next chunk); `context_position_ids` keeps the full rows'
    positions for the attention's mask (model/ulysses.py) and RoPE sees each chunk's slice of them; n_tokens
    counts the real tokens of the chunk (`lengths`: each row's), so the group's chunks sum to the row's counts;
    `row_targets` (host only) keeps each whole row's target count, for the objectives that count whole rows
    (pairs, KTO examples: objectives/preference.py response_rows)."""
    width = batch["input_ids"].shape[1]
    if width % size:
        raise ValueError(f"row width {width} is not a multiple of {size}")
    step = width // size
    lo, hi = index * step, (index + 1) * step
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(width, dtype=torch.long).expand(batch["input_ids"].shape[0], width).contiguous()
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "position_ids", "n_tokens")}
    out.update(input_ids=batch["input_ids"][:, lo:hi].contiguous(), labels=batch["labels"][:, lo:hi].contiguous(),
               position_ids=pos[:, lo:hi].contiguous(), context_position_ids=pos,
               n_tokens=torch.tensor(sum(min(max(n - lo, 0), step) for n in lengths)),
               row_targets=(batch["labels"] != IGNORE).sum(1))
    return out


class _StepBatches(torch.utils.data.Dataset):
    """Item i = this rank's collated micro-batches of global step start + i (map-style keeps the order);
    with context = (N, index), each cut to this rank's chunk of the sequence (`context_chunk`)."""

    def __init__(self, sampler: StepSampler, examples, pad_id: int, start: int, stop: int, flatten: bool,
                 context: Optional[tuple[int, int]] = None):
        self.sampler, self.examples, self.pad_id = sampler, examples, pad_id
        self.start, self.stop, self.flatten, self.context = start, stop, flatten, context

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return [self.micro_batch([self.examples[j] for j in ids])
                for ids in self.sampler.rank_micro_batches(self.start + i)]

    def micro_batch(self, examples: list) -> dict[str, torch.Tensor]:
        if self.context is None:
            return collate(examples, self.pad_id, flatten=self.flatten)
        size, index = self.context
        # the width also divides into N chunks (memory/estimate.py context_width counts it so)
        batch = collate(examples, self.pad_id, multiple=math.lcm(PAD_MULTIPLE, size))
        return context_chunk(batch, row_lengths(examples), size, index)


def row_lengths(examples: list[Example] | list[Pair] | list[Feedback]) -> list[int]:
    """The real length of each row `collate` makes of `examples`, in its row order."""
    if isinstance(examples[0], Feedback):
        examples = [f.example for f in examples] + [f.kl for f in examples]
    if isinstance(examples[0], Pair):
        examples = [p.chosen for p in examples] + [p.rejected for p in examples]
    return [len(e.input_ids) for e in examples]


def step_batches(sampler: StepSampler, examples, pad_id: int, start: int, stop: int, num_workers: int = 0,
                 pin_memory: bool = False, flatten: bool = False, context: Optional[tuple[int, int]] = None
                 ) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Iterate steps [start, stop): each item is this rank's list of micro-batch dicts, built by workers.
    context: (parallel.context_parallel N, this rank's chunk) when N > 1.

    The sampler advances its own position as steps are handed out: once step s's batches are out,
    `sampler.step` is s + 1, the data position a checkpoint taken after step s resumes from."""
    ds = _StepBatches(sampler, examples, pad_id, start, stop, flatten, context)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=pin_memory, prefetch_factor=2 if num_workers > 0 else None,
                                         persistent_workers=False)
    for step, micro_batches in enumerate(loader, start + 1):
        sampler.step = step
        yield micro_batches
