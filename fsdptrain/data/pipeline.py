"""From config to what the training loop consumes: examples, their sampler and the batch iterator.

`load_examples` gives the tokenised examples (the built-in synthetic task when
data.datasets is empty, else the configured data sets through the per-node
cache), packed into rows when data.packing is on, and logs what happened to
the data: records read, skipped and why, truncated, dropped, target tokens.
`build_sampler` and `batches` wrap loader.py with the config's choices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config.schema import PAIRWISE, TWO_ROWS, Config
from ..core.errors import ConfigError, UserError
from ..dist.plan import per_rank
from . import evalset
from .cache import Settings, prepare
from .encode import example_length, tokenize_all
from .loader import StepSampler, padded, resolve_rank_sizes, step_batches
from .packing import pack
from .sources import resolve
from .synthetic import generate
from .tokenizer import apply_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def default_cache_dir() -> Path:
    return Path(os.environ.get("FSDPTRAIN_CACHE", "~/.cache/fsdptrain/tokenized")).expanduser()


def check(cfg: Config) -> None:
    """Data keys that only make sense together."""
    d = cfg.data
    if d.token_budget is not None and d.micro_batch_sizes:
        raise ConfigError("data.token_budget and data.micro_batch_sizes exclude each other; "
                          "a token budget already balances ranks by tokens")
    if d.balance != "none" and (d.micro_batch_sizes or d.token_budget is not None):
        other = "data.micro_batch_sizes" if d.micro_batch_sizes else "data.token_budget"
        raise ConfigError(f"data.balance and {other} exclude each other: both decide how much of a step each rank "
                          f"takes; choose one (data.balance=none, or remove {other})")
    if d.balance == "speed" and cfg.parallel.compile:
        raise ConfigError("data.balance: speed times each rank's blocks with forward hooks, which parallel.compile "
                          "would trace into the compiled blocks; give the ranks' weights instead (e.g. "
                          "data.balance=[2,1]) or set parallel.compile=false")
    longest = (d.pack_length or d.max_length) if d.packing else d.max_length
    rows = rows_per_item(cfg)
    if d.token_budget is not None and d.token_budget < padded(longest) * rows:
        what = "example" if rows == 1 else "KTO example (two rows)" if cfg.train.objective == "kto" else \
            "pair (two rows)"
        raise ConfigError(f"data.token_budget: {d.token_budget} is below one padded {what} of {longest} tokens "
                          f"({padded(longest) * rows} with padding); raise it")
    if d.pack_length is not None and d.pack_length < d.max_length:
        raise ConfigError(f"data.pack_length: {d.pack_length} is below data.max_length {d.max_length}; "
                          "a row must hold the longest example")


def rows_per_item(cfg: Config) -> int:
    """Rows one item of the data takes in a batch: a preference pair two (chosen and rejected), a KTO example two
    (its own and its KL row)."""
    return 2 if cfg.train.objective in TWO_ROWS else 1


def check_objective(cfg: Config, specs: list, key: str = "data.datasets") -> None:
    """Preference pairs for dpo and rm, and only for them: a data set of the other kind is one line."""
    objective = cfg.train.objective
    for spec in specs:
        if objective == "kto" and not spec.feedback:
            raise UserError(f"{key}: data set '{spec.name}' has no kto_tag column (KTO data tags each record "
                            "desirable or not); train.objective kto needs one: map it in the data set's columns, "
                            'e.g. "columns": {"kto_tag": "label"} (docs/preference.md)')
        if objective != "kto" and spec.feedback:
            raise UserError(f"{key}: data set '{spec.name}' is KTO data (a kto_tag column); train it with "
                            "train.objective=kto, or remove its kto_tag column")
        if objective in PAIRWISE and not spec.ranking:
            raise UserError(f"{key}: data set '{spec.name}' is not preference data (no `ranking: true` in its "
                            f"dataset_info.json entry); train.objective {objective} trains on pairs: pick a ranking "
                            "data set or mark this one ranking with chosen/rejected columns")
        if objective not in PAIRWISE and spec.ranking:
            raise UserError(f"{key}: data set '{spec.name}' holds preference pairs (ranking: true); train it with "
                            "train.objective=dpo, or pick a supervised or pretraining data set")


def require_pairs_given(cfg: Config) -> None:
    """No data sets means the synthetic task, which has no preference pairs."""
    if cfg.train.objective in PAIRWISE:
        raise ConfigError(f"data.datasets: train.objective {cfg.train.objective} needs preference data (no "
                          "synthetic task makes pairs); list data sets with `ranking: true` (docs/preference.md)")
    if cfg.train.objective == "kto":
        raise ConfigError("data.datasets: train.objective kto needs KTO data (no synthetic task tags examples); "
                          "list data sets with a kto_tag column (docs/preference.md)")


def load_examples(cfg: Config, tokenizer: PreTrainedTokenizerBase, rank: int = 0, local_rank: int = 0,
                  log: Callable[[str], None] = print):
    """The run's examples (a sequence of encode.Example), packed when configured."""
    check(cfg)
    apply_template(tokenizer, cfg.data.template)
    examples, lengths = tokenized(cfg, tokenizer, cfg.data.datasets, rank, local_rank, log)
    return pack_rows(cfg, examples, lengths, log)


def tokenized(cfg: Config, tokenizer: PreTrainedTokenizerBase, datasets: list, rank: int, local_rank: int,
              log: Callable[[str], None], what: str = "data"):
    """(examples, lengths) of `datasets` (empty: the synthetic task), unpacked; `what` names them in the logs."""
    d = cfg.data
    if not datasets:
        require_pairs_given(cfg)
        conversations = generate(d.synthetic_task, d.synthetic_examples, cfg.seed)
        examples, st = tokenize_all(tokenizer, conversations, d.max_length, d.train_on_prompt, d.mask_history)
        log(f"{what}: synthetic '{d.synthetic_task}': {st.summary()}")
        lengths = [len(e.input_ids) for e in examples]
    else:
        specs = resolve(datasets, d.dataset_dir)
        check_objective(cfg, specs, "data.datasets" if what == "data" else "data.eval_datasets")
        settings = Settings(d.max_length, d.train_on_prompt, d.mask_history, d.max_samples, cfg.seed, d.num_proc,
                            d.template)
        cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
        try:
            examples, st, per_set, hit = prepare(specs, tokenizer, settings, cache_dir, rank, local_rank,
                                                 d.overwrite_cache, log, cfg.parallel.timeout_minutes)
        except UserError as e:
            if what == "data":
                raise
            raise UserError(f"data.eval_datasets: {e}") from None
        log(f"{what}: {'cache hit' if hit else 'tokenised'} {examples.path}")
        for entry in per_set:
            skipped = ", ".join(f"{n} {r}" for r, n in entry["skipped"].items()) or "none"
            log(f"{what}: '{entry['name']}': read {entry['read']}, skipped {sum(entry['skipped'].values())} "
                f"({skipped}), kept {entry['kept']}, truncated {entry['truncated']}, "
                f"dropped (no target token left) {entry['dropped_no_target']}")
        log(f"{what}: total: {st.summary()}")
        lengths = examples.lengths
    if not len(examples):
        if what != "data":
            raise UserError("data.eval_datasets: every eval example was dropped (no target tokens left after "
                            "truncation); raise data.max_length or check the eval data sets")
        raise UserError("data: every example was dropped (no target tokens left after truncation); "
                        "raise data.max_length or check the data sets")
    return examples, lengths


def pack_rows(cfg: Config, examples, lengths, log: Callable[[str], None], what: str = "data"):
    """Examples packed into rows when data.packing is on, else unchanged."""
    d = cfg.data
    if d.packing:
        capacity = d.pack_length or d.max_length
        packed = pack(examples, lengths, capacity)
        used = int(sum(int(n) for n in lengths))
        log(f"{what}: packed {len(examples)} examples into {len(packed)} rows of {capacity} tokens "
            f"({100 * used / (len(packed) * capacity):.1f}% filled)")
        return packed
    return examples


def load_train_eval(cfg: Config, tokenizer: PreTrainedTokenizerBase, rank: int = 0, local_rank: int = 0,
                    log: Callable[[str], None] = print, examples=None):
    """(training examples, eval examples or None), each packed when configured. data.val_size splits the data
    before packing (seeded, the same on any world size); data.eval_datasets are tokenised and cached like the
    training data. `examples` (tests, notebooks) replaces the configured training data as it is: not split by
    val_size, not packed."""
    d = cfg.data
    given = examples is not None
    if not given or d.eval_datasets:
        check(cfg)
        apply_template(tokenizer, d.template)
    if given:
        lengths = lengths_of(examples)
    else:
        examples, lengths = tokenized(cfg, tokenizer, d.datasets, rank, local_rank, log)
    evals = None
    if d.val_size and not given:  # given examples are the training data as they are
        examples, evals = evalset.split(examples, lengths, d.val_size, cfg.seed)
        lengths = examples.lengths
        log(f"data: val_size {d.val_size}: {len(evals)} examples held out for evaluation, {len(examples)} to train")
        evals = pack_rows(cfg, evals, evals.lengths, log, "eval data")
    elif d.eval_datasets:
        evals, eval_lengths = tokenized(cfg, tokenizer, d.eval_datasets, rank, local_rank, log, "eval data")
        both = evalset.overlap_count(examples, evals)
        if both:
            log(f"eval data: warning: {both} of the {len(evals)} eval examples are also training examples; "
                "the eval loss of those measures memorisation (check data.eval_datasets against data.datasets)")
        evals = pack_rows(cfg, evals, eval_lengths, log, "eval data")
    return (examples if given else pack_rows(cfg, examples, lengths, log)), evals


def lengths_of(examples) -> list[int]:
    if hasattr(examples, "lengths"):
        return examples.lengths
    return [example_length(examples[i]) for i in range(len(examples))]


def build_sampler(cfg: Config, examples, world_size: int, rank: int, local_world_size: int) -> StepSampler:
    d = cfg.data
    sizes = resolve_rank_sizes(d.micro_batch_sizes, world_size, local_world_size)
    shares = initial_shares(d.balance, world_size, local_world_size)
    return StepSampler(len(examples), world_size, rank, cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                       cfg.seed, d.shuffle, d.drop_last, rank_batch_sizes=sizes, token_budget=d.token_budget,
                       lengths=lengths_of(examples) if d.token_budget is not None or shares else None,
                       rows_per_item=rows_per_item(cfg), shares=shares)


def initial_shares(balance, world_size: int, local_world_size: int) -> Optional[list[float]]:
    """The ranks' shares of a step's tokens at the start: None (by count) for data.balance none, equal for speed
    (measured once the run has begun), the given weights (one per rank or per node) normalised."""
    if balance == "none":
        return None
    if balance == "speed":
        return [1.0 / world_size] * world_size
    weights = per_rank("data.balance", balance, world_size, local_world_size,
                       "one weight per rank or one per node")
    return [float(w) / sum(weights) for w in weights]


def batches(cfg: Config, sampler: StepSampler, examples, pad_id: int, start: int, stop: int, device_type: str,
            context_index: int = 0):
    """This rank's micro-batches for steps [start, stop), prepared by DataLoader workers; under
    parallel.context_parallel N, each cut to chunk `context_index` of the sequence."""
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if device_type == "cuda" else 0)
    if cfg.data.balance == "speed":
        # the split between ranks follows shares measured during the run: each step's batches are cut here, when
        # the loop asks for them, not ahead in worker processes holding a copy of the sampler's old shares
        workers = 0
    flatten = cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2"
    n = cfg.parallel.context_parallel
    return step_batches(sampler, examples, pad_id, start, stop, workers, device_type == "cuda", flatten,
                        (n, context_index) if n > 1 else None)
