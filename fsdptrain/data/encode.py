"""Render conversations with the chat template and mask everything but the assistant's tokens.

Rendering is render.py's: it gives the conversation as one or more rendered examples
(several where the template re-renders earlier turns, e.g. Qwen3 dropping earlier
reasoning), each with the character ranges of its assistant turns (their content,
tool calls and end-of-turn marker), checked to hold every message and tool call.
Those turns are the targets; all other tokens get label -100. The full text is
tokenised once and cut at those character boundaries via the fast tokenizer's
offsets; if a token straddles a boundary, each prefix is tokenised on its own
instead.

Options: train_on_prompt trains every token; mask_history trains only the last
assistant turn. Truncation to cutoff_len follows LLaMA-Factory's rule per
(prompt, response) pair: a short response is kept whole and the prompt cut,
else a short prompt is kept and the response cut, else both shrink in
proportion; the prompt keeps its end (the turn header and the text nearest the
response). With mask_history the last pair gets the budget first. A document
(pretraining text) is split into cutoff_len chunks instead, every token a target.

Work per record is bounded by cutoff_len, not by the record's size: the middle
of an over-long turn, which truncation would drop anyway, is left out before
tokenising (`elide`), and a long document is tokenised in slices (`tokenize_document`).
"""

from __future__ import annotations

import functools
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from .render import OPEN_END, Chain, TemplateError, render_chains

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
MARGIN = 64  # tokens an elided turn keeps beyond max_length (see elide)
EDGE = 256  # characters: the far end of an elided turn is kept, between EDGE/2 and EDGE long
SLICE_CHARS = 1 << 16  # a document longer than this is tokenised in slices of about this many characters


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: label[t] is the target *at* position t (-100: not trained)
    seq_lens: Optional[list[int]] = None  # a packed row: lengths of the examples in it (None: one example)

    @property
    def n_targets(self) -> int:
        # position 0 has nothing before it to predict from, so it is never a target
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class Pair:
    """A preference pair: one prompt with the chosen and with the rejected response, two rows that always travel
    together (one micro-batch, one forward). The prompt's labels are IGNORE in both; each response is a target."""
    chosen: Example
    rejected: Example

    @property
    def n_targets(self) -> int:
        return self.chosen.n_targets + self.rejected.n_targets


@dataclass
class Feedback:
    """A KTO example: the prompt with its response (`example`, tagged desirable or not) and the same prompt with
    another example's response (`kl`: LLaMA-Factory's mismatched pair, scored only for the KL estimate). The two
    rows always travel together (one micro-batch, one forward)."""
    example: Example
    kl: Example
    desirable: bool

    @property
    def n_targets(self) -> int:
        return self.example.n_targets


def example_length(e: Example | Pair | Feedback) -> int:
    """The tokens of an example's row; of a pair (a KTO example), its longer row (both rows are padded to it)."""
    if isinstance(e, Pair):
        return max(len(e.chosen.input_ids), len(e.rejected.input_ids))
    if isinstance(e, Feedback):
        return max(len(e.example.input_ids), len(e.kl.input_ids))
    return len(e.input_ids)


class PairError(ValueError):
    """A preference pair that cannot be trained as given (the message says why)."""


@dataclass
class TokenizeStats:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    split: int = 0  # extra rows: long documents cut into cutoff_len chunks, conversations re-rendered per turn
    dropped_no_target: int = 0
    target_tokens: int = 0
    reasons: dict = field(default_factory=dict)  # records skipped before tokenising: reason -> count

    def add(self, other: TokenizeStats) -> None:
        for k in ("read", "kept", "truncated", "split", "dropped_no_target", "target_tokens"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for r, n in other.reasons.items():
            self.reasons[r] = self.reasons.get(r, 0) + n

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) or "none"
        return (f"read {self.read}, skipped {sum(self.reasons.values())} ({skipped}), kept {self.kept} examples, "
                f"truncated {self.truncated}, split into {self.split} extra rows, "
                f"dropped (no target token left) {self.dropped_no_target}, target tokens {self.target_tokens}")


def segments(tok: PreTrainedTokenizerBase, messages: list[dict],
             tools: Optional[list] = None) -> list[tuple[list[int], bool]]:
    """The conversation's tokens as consecutive (ids, is_assistant_turn) runs.

    For a template that renders it as one example; TemplateError if it takes several (see render.py).
    """
    chains = render_chains(tok, messages, tools)
    if len(chains) != 1:
        raise TemplateError("re-renders earlier turns: this conversation takes several examples")
    return [(ids, t) for ids, t in _tokenize_runs(tok, chains[0].text, chains[0].cuts) if ids]


def _tokenize_runs(tok: PreTrainedTokenizerBase, full: str,
                   cuts: list[tuple[int, bool]]) -> list[tuple[list[int], bool]]:
    """One (ids, is_target) per cut (a run may be empty)."""
    if OPEN_END in (tok.chat_template or ""):  # messages abut (no markers): each is tokenised on its own, as
        return _runs_apart(tok, full, cuts)   # LLaMA-Factory does, or one's end would merge with the next's start
    fast = _runs_by_offsets(tok, full, cuts)
    return fast if fast is not None else _runs_by_prefixes(tok, full, cuts)


def _runs_by_offsets(tok: PreTrainedTokenizerBase, full: str,
                     cuts: list[tuple[int, bool]]) -> Optional[list[tuple[list[int], bool]]]:
    """Tokenise the whole conversation once and cut it at the turns' character boundaries.

    None when the tokenizer gives no offsets or a token straddles a boundary
    (then every prefix is tokenised on its own instead).
    """
    if not getattr(tok, "is_fast", False):
        return None
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]

    def at(char: int) -> Optional[int]:
        """The index of the token starting exactly at `char` (None: a token straddles it)."""
        if char == len(full):
            return len(ids)
        k = enc.char_to_token(char)
        if k is None or offsets[k][0] != char or (k > 0 and offsets[k - 1][1] > char):
            return None
        return k

    out: list[tuple[list[int], bool]] = []
    cur = 0
    for char, is_target in cuts:
        k = at(char)
        if k is None or k < cur:
            return None
        out.append((ids[cur:k], is_target))
        cur = k
    return out


def _runs_by_prefixes(tok: PreTrainedTokenizerBase, full: str,
                      cuts: list[tuple[int, bool]]) -> list[tuple[list[int], bool]]:
    """Each prefix tokenised on its own; where a prefix's tokens do not extend the previous one's (a token
    merges across the boundary), every run is tokenised on its own instead, as LLaMA-Factory encodes each
    prompt and response separately."""
    encoded = tok([full[:char] for char, _ in cuts], add_special_tokens=False)["input_ids"]
    out: list[tuple[list[int], bool]] = []
    cur: list[int] = []
    for ids, (_, is_target) in zip(encoded, cuts):
        if ids[: len(cur)] != cur:
            return _runs_apart(tok, full, cuts)
        out.append((ids[len(cur):], is_target))
        cur = ids
    return out


def _runs_apart(tok: PreTrainedTokenizerBase, full: str,
                cuts: list[tuple[int, bool]]) -> list[tuple[list[int], bool]]:
    starts = [0] + [char for char, _ in cuts[:-1]]
    texts = [full[a:b] for a, (b, _) in zip(starts, cuts)]
    encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [(ids if text else [], is_target) for ids, text, (_, is_target) in zip(encoded, texts, cuts)]


# ----------------------------------------------------------------------------- bounding the work per record
#
# Truncation (build_example) keeps at most max_length tokens of a conversation: of each assistant turn only its
# first tokens, of the text before it (system, user and tool turns, template headers: the pair's prompt) only
# its last. So a run (the text between two turn boundaries) longer than 2 x (max_length + MARGIN) + EDGE
# characters has its middle left out before tokenising (`elide`): it keeps the end that can survive, holding at
# least max_length + MARGIN tokens, plus EDGE/2 to EDGE characters of its other end, so that it still meets
# its neighbours as in the whole text. The tokens that survive truncation are those of tokenising everything:
#  - the cuts are at word boundaries (`cut_point`), where the tokenizer starts a new word on either side, so
#    each kept part tokenises as it does in the whole text; MARGIN absorbs the few tokens that can differ next
#    to a cut without a word boundary near it (a long run without spaces or punctuation);
#  - the run still holds more than max_length tokens, so the example is truncated either way, and each test
#    of the cutoff rule (infer_lengths) that compares a side with half the budget comes out the same: a side
#    longer than the budget stays longer. Only its proportional branch (prompt and response both longer than
#    half the budget) needs the full lengths: there the left-out middle is counted, in slices (bounded memory,
#    work as before), and only then;
#  - runs shorter than the threshold are never touched, so ordinary records tokenise exactly as before.
# The chat template still renders the whole conversation (text costs a few bytes a character, tokenising with
# offsets hundreds a token), so templates that parse a message (e.g. reasoning in <think> tags) see it whole.

_WORD_GAP = re.compile(r"(?<=[^\W_])(?= [^\W_])")  # before a space between two letters or digits
_PUNCTUATION = re.compile(r"(?<=[^\W_])(?=[^\w\s]|_)")  # before a punctuation mark that follows a letter or digit


def cut_point(text: str, lo: int, hi: int, last: bool = True) -> int:
    """A place in [lo, hi] where `text` can be cut so that both parts tokenise as they do in the whole text.

    Subword tokenizers split text into words before tokenising each word on its own: by a regular expression
    (GPT-2, Llama 3, Qwen: a word takes the space or punctuation mark in front of it) or at spaces
    (SentencePiece's Metaspace). Right before a space between two letters or digits every one of them starts
    a new word, and right before a punctuation mark that follows a letter or digit the regular-expression ones
    do. The last such place in [lo, hi] is taken (the first with last=False), spaces first; with none, `hi`
    (`lo`), where only the tokens next to the cut can differ.
    """
    for pattern in (_WORD_GAP, _PUNCTUATION):
        found = [m.start() for m in pattern.finditer(text, lo, min(len(text), hi + 2)) if m.start() <= hi]
        if found:
            return found[-1] if last else found[0]
    return hi if last else lo


def _slices(text: str, start: int = 0, stop: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """text[start:stop] as consecutive slices of at most SLICE_CHARS characters, cut at `cut_point`s."""
    stop = len(text) if stop is None else stop
    while start < stop:
        end = stop if stop - start <= SLICE_CHARS else cut_point(text, start + SLICE_CHARS // 2, start + SLICE_CHARS)
        yield start, end
        start = end


def _count(tok: PreTrainedTokenizerBase, text: str, start: int = 0, stop: Optional[int] = None) -> int:
    """Tokens in text[start:stop], tokenised in slices."""
    return sum(len(tok(text[a:b], add_special_tokens=False)["input_ids"]) for a, b in _slices(text, start, stop))


def elide(tok: PreTrainedTokenizerBase, run: str, need: int, keep_start: bool) -> Optional[tuple[int, int]]:
    """(head, tail): keep run[:head] + run[tail:], or None to keep the whole run.

    The kept end (the start with keep_start, else the end) holds at least `need` tokens, the other between
    EDGE/2 and EDGE characters. The kept end is found by tokenising growing parts (2 x need characters, then
    twice as many, ...), so the work is bounded by `need`, not by the run's length.
    """
    k = 2 * need
    while k + EDGE < len(run):
        if keep_start:
            head, tail = cut_point(run, k // 2, k), cut_point(run, len(run) - EDGE, len(run) - EDGE // 2)
            part = run[:head]
        else:
            head, tail = cut_point(run, EDGE // 2, EDGE), cut_point(run, len(run) - k, len(run) - k // 2, last=False)
            part = run[tail:]
        if _count(tok, part) >= need:
            return head, tail
        k *= 2
    return None


def _elide_runs(tok: PreTrainedTokenizerBase, full: str, cuts: list[tuple[int, bool]],
                need: int) -> tuple[str, list[tuple[int, bool]], dict[int, Callable[[], int]]]:
    """The conversation with every over-long run elided, the runs' new ends, and per elided run (by index) a
    function that counts the tokens left out of it."""
    pieces: list[str] = []
    new_cuts: list[tuple[int, bool]] = []
    hidden: dict[int, Callable[[], int]] = {}
    start = length = 0
    for i, (end, is_target) in enumerate(cuts):
        kept = None
        if end - start > 2 * need + EDGE:
            run = full[start:end]
            kept = elide(tok, run, need, keep_start=is_target)
        if kept is not None:
            head, tail = kept
            hidden[i] = functools.partial(_count, tok, run, head, tail)
            pieces.append(run[:head] + run[tail:])
        else:
            pieces.append(full[start:end])
        length += len(pieces[-1])
        new_cuts.append((length, is_target))
        start = end
    if not hidden:
        return full, cuts, {}
    return "".join(pieces), new_cuts, hidden


def infer_lengths(source: int, target: int, budget: int) -> tuple[int, int]:
    """LLaMA-Factory's cutoff rule for one (prompt, response) pair: how many of each to keep."""
    if target * 2 < budget:  # short response: keep it, cut the prompt
        max_target = budget
    elif source * 2 < budget:  # short prompt: keep it, cut the response
        max_target = budget - source
    else:  # both long: shrink in proportion
        max_target = int(budget * target / (source + target))
    new_target = min(max_target, target)
    new_source = min(max(budget - new_target, 0), source)
    return new_source, new_target


def build_example(segs: list[tuple[list[int], bool]], max_length: int, train_on_prompt: bool = False,
                  mask_history: bool = False,
                  hidden: Optional[dict[int, Callable[[], int]]] = None) -> tuple[Example, bool]:
    """(example, truncated) from segments: label masking and cutoff_len truncation.

    `hidden` counts the tokens left out of elided segments (by index); the cutoff rule reads them only where
    it needs a pair's full lengths.
    """
    hidden = hidden or {}
    last = max((i for i, (_, t) in enumerate(segs) if t), default=-1)
    # (prompt ids, response ids, response trained, indices of the segments in the pair)
    pairs: list[tuple[list[int], list[int], bool, list[int]]] = []
    src: list[int] = []
    members: list[int] = []
    for i, (ids, is_target) in enumerate(segs):
        if is_target:
            pairs.append((src, ids, not mask_history or i == last, members + [i]))
            src, members = [], []
        else:
            src = src + ids
            members.append(i)
    if src:
        pairs.append((src, [], False, members))
    total = sum(len(s) + len(t) for s, t, _, _ in pairs)
    truncated = total > max_length
    if truncated:
        budget, kept = max_length, {}
        for k in (reversed(range(len(pairs))) if mask_history else range(len(pairs))):
            s, t, trained, members = pairs[k]
            if budget <= 0:
                kept[k] = ([], [], trained, members)
                continue
            n_s, n_t = len(s), len(t)
            if 2 * n_s >= budget and 2 * n_t >= budget:  # the proportional branch: the full lengths
                n_s += sum(hidden[i]() for i in members if i in hidden and not segs[i][1])
                n_t += sum(hidden[i]() for i in members if i in hidden and segs[i][1])
            ns, nt = infer_lengths(n_s, n_t, budget)
            kept[k] = (s[len(s) - ns:] if ns else [], t[:nt], trained, members)
            budget -= ns + nt
        pairs = [kept[k] for k in range(len(pairs))]
    input_ids: list[int] = []
    labels: list[int] = []
    for s, t, trained, _ in pairs:
        input_ids += s + t
        labels += ((s if train_on_prompt else [IGNORE] * len(s))
                   + (t if trained or train_on_prompt else [IGNORE] * len(t)))
    return Example(input_ids, labels), truncated


def tokenize_conversation(tok: PreTrainedTokenizerBase, messages: list[dict], max_length: int,
                          tools: Optional[list] = None, train_on_prompt: bool = False,
                          mask_history: bool = False) -> tuple[Example, bool]:
    """(example, truncated) for a template that renders the conversation as one example (see `segments`)."""
    chains = render_chains(tok, messages, tools)
    if len(chains) != 1:
        raise TemplateError("re-renders earlier turns: this conversation takes several examples")
    return tokenize_chain(tok, chains[0], max_length, train_on_prompt, mask_history)


def conversation_examples(tok: PreTrainedTokenizerBase, messages: list[dict], max_length: int,
                          tools: Optional[list] = None, train_on_prompt: bool = False,
                          mask_history: bool = False) -> list[tuple[Example, bool]]:
    """[(example, truncated)]: one per example the template renders the conversation as (render.py), each
    training its assistant turns (content + end marker) unless told otherwise; raises TemplateError."""
    chains = render_chains(tok, messages, tools, last_only=mask_history)
    return [tokenize_chain(tok, c, max_length, train_on_prompt, mask_history) for c in chains]


def tokenize_chain(tok: PreTrainedTokenizerBase, chain: Chain, max_length: int, train_on_prompt: bool = False,
                   mask_history: bool = False) -> tuple[Example, bool]:
    """(example, truncated) of one rendered example.

    Over-long runs are elided first (see `elide`): the work is bounded by max_length, the result the same.
    """
    full, cuts, hidden = _elide_runs(tok, chain.text, chain.cuts, max_length + MARGIN)
    segs: list[tuple[list[int], bool]] = []
    lazy: dict[int, Callable[[], int]] = {}
    for i, (ids, is_target) in enumerate(_tokenize_runs(tok, full, cuts)):
        if ids:
            if i in hidden:
                lazy[len(segs)] = hidden[i]
            segs.append((ids, is_target))
    return build_example(segs, max_length, train_on_prompt, mask_history, lazy)


def _special_tokens(tok: PreTrainedTokenizerBase) -> Optional[tuple[list[int], list[int]]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS), None if not found."""
    full, bare = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return None


def tokenize_document(tok: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """A pretraining document's tokens plus end-of-sequence, as int32.

    A document longer than SLICE_CHARS characters is tokenised in slices of about that many characters, cut at
    word boundaries (`cut_point`), so that memory stays bounded however long it is (the tokenizer's own
    records of a token cost hundreds of bytes; here a token costs 4 bytes); at those boundaries the slices give
    the tokens of the whole.
    """
    wrap = _special_tokens(tok) if len(text) > SLICE_CHARS else None
    if wrap is None:
        ids = array("i", tok(text)["input_ids"])
    else:
        ids = array("i", wrap[0])  # grows in place as slices are added: no second copy of the document
        for a, b in _slices(text):
            ids.extend(tok(text[a:b], add_special_tokens=False)["input_ids"])
        ids.extend(wrap[1])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return np.frombuffer(ids, dtype=np.int32)


def chunk_lengths(n_tokens: int, max_length: int) -> tuple[list[int], int]:
    """A document of n_tokens in max_length chunks: the lengths of the chunks kept, and how many chunks there are.

    A chunk of one token has no target (position 0 never is one), so a 1-token tail is dropped.
    """
    sizes = [min(max_length, n_tokens - i) for i in range(0, n_tokens, max_length)]
    return [n for n in sizes if n > 1], len(sizes)


def tokenize_record(tok: PreTrainedTokenizerBase, record: dict, max_length: int, train_on_prompt: bool = False,
                    mask_history: bool = False) -> tuple[list[Example], TokenizeStats]:
    """One common-form record (see formats.py) -> examples (none if it has no target left; a pair record gives
    one Pair) and its counts. Raises PairError for a pair whose prompt truncation would remove."""
    st = TokenizeStats(read=1)
    if "text" in record:
        ids = tokenize_document(tok, record["text"]).tolist()
        kept_lengths, n_chunks = chunk_lengths(len(ids), max_length)
        kept = [Example(ids[i:i + n], ids[i:i + n]) for i, n in zip(range(0, len(ids), max_length), kept_lengths)]
        st.split = n_chunks - 1
        st.dropped_no_target = n_chunks - len(kept)
    elif "response" in record:
        feedback, truncated = tokenize_feedback(tok, record, max_length)
        st.truncated = int(truncated)
        kept = [feedback]
    elif "chosen" in record:
        pair, truncated = tokenize_pair(tok, record["messages"], record["chosen"], record["rejected"], max_length,
                                        record.get("tools"))
        st.truncated = int(truncated)
        kept = [pair]
    else:
        made = conversation_examples(tok, record["messages"], max_length, record.get("tools"), train_on_prompt,
                                     mask_history)
        st.truncated = sum(int(t) for _, t in made)
        st.split = max(len(made) - 1, 0)
        kept = [ex for ex, _ in made if ex.n_targets > 0]
        st.dropped_no_target = max(len(made), 1) - len(kept)
    st.kept = len(kept)
    st.target_tokens = sum(e.n_targets for e in kept)
    return kept, st


# ----------------------------------------------------------------------------- preference pairs


def _last_turn(tok: PreTrainedTokenizerBase, messages: list[dict], reply: dict, tools: Optional[list],
               need: int, apart: bool = False) -> tuple[list[list[int]], list[int], int, int]:
    """(prompt runs' ids, the reply's ids, tokens elided from the prompt, from the reply): the conversation
    `messages + [reply]` rendered (its last example), the reply being its last assistant turn. apart: every run
    tokenised on its own."""
    chain = render_chains(tok, messages + [reply], tools, last_only=True)[-1]
    full, cuts, hidden = _elide_runs(tok, chain.text, chain.cuts, need)
    runs = [ids for ids, _ in (_runs_apart if apart else _tokenize_runs)(tok, full, cuts)]
    last = len(runs) - 1
    return runs[:-1], runs[-1], sum(f() for i, f in hidden.items() if i < last), \
        sum(f() for i, f in hidden.items() if i == last)


def tokenize_pair(tok: PreTrainedTokenizerBase, messages: list[dict], chosen: dict, rejected: dict,
                  max_length: int, tools: Optional[list] = None) -> tuple[Pair, bool]:
    """(pair, truncated): the prompt `messages` with each response, rendered with the chat template.

    The prompt is everything before the response's turn (earlier assistant turns included, none trained); both
    rows share its tokens. Cut to max_length as LLaMA-Factory's pairwise preprocessing does: its cutoff rule
    (infer_lengths) on (prompt, the longer response), both responses cut to the same length; as in SFT the prompt
    keeps its end (the turn header before the response). PairError when the cut would leave no token of the
    prompt's messages (only the template's header before the response).
    """
    need = max_length + MARGIN
    prompt_c, reply_c, hid_p, hid_c = _last_turn(tok, messages, chosen, tools, need)
    prompt_r, reply_r, _, hid_r = _last_turn(tok, messages, rejected, tools, need)
    if prompt_c != prompt_r:  # a token merged across the prompt's end differently: tokenise each run on its own
        prompt_c, reply_c, hid_p, hid_c = _last_turn(tok, messages, chosen, tools, need, apart=True)
        prompt_r, reply_r, _, hid_r = _last_turn(tok, messages, rejected, tools, need, apart=True)
        if prompt_c != prompt_r:
            raise TemplateError("renders the prompt differently before the chosen and the rejected response")
    prompt = [t for run in prompt_c for t in run]
    header = len(prompt_c[-1]) if len(prompt_c) > 1 else 0  # the template's text after the last prompt message
    n_s, n_t = len(prompt), max(len(reply_c), len(reply_r))
    truncated = n_s + n_t > max_length or bool(hid_p or hid_c or hid_r)
    ns, nt = n_s, n_t
    if truncated:
        if 2 * n_s >= max_length and 2 * n_t >= max_length:  # the proportional branch: the full lengths
            n_s, n_t = n_s + hid_p, max(len(reply_c) + hid_c, len(reply_r) + hid_r)
        ns, nt = infer_lengths(n_s, n_t, max_length)
        ns = min(ns, len(prompt))
        if ns <= header:
            raise PairError(f"truncation to data.max_length {max_length} would cut the prompt away entirely "
                            f"({n_s} prompt tokens, responses of {len(reply_c) + hid_c} and {len(reply_r) + hid_r})")
    kept = prompt[len(prompt) - ns:]
    rows = []
    for reply in (reply_c, reply_r):
        cut = reply[:nt]
        rows.append(Example(kept + cut, [IGNORE] * len(kept) + cut))
    return Pair(*rows), truncated


def tokenize_feedback(tok: PreTrainedTokenizerBase, record: dict, max_length: int) -> tuple[Feedback, bool]:
    """(KTO example, truncated): a common-form KTO record with its `kl_response` (cache.py assigns it) rendered
    as two rows, each cut on its own by LLaMA-Factory's rule for (prompt, response), as its feedback
    preprocessing does (a pair of one response is cut exactly so). PairError as tokenize_pair."""
    messages, tools = record["messages"], record.get("tools")
    own, cut = tokenize_pair(tok, messages, record["response"], record["response"], max_length, tools)
    kl, kl_cut = tokenize_pair(tok, messages, record["kl_response"], record["kl_response"], max_length, tools)
    return Feedback(own.chosen, kl.chosen, bool(record["desirable"])), cut or kl_cut


def tokenize_all(tok: PreTrainedTokenizerBase, conversations: list, max_length: int, train_on_prompt: bool = False,
                 mask_history: bool = False) -> tuple[list[Example], TokenizeStats]:
    """In-process tokenisation of message lists or common-form records (the synthetic task, tests)."""
    stats = TokenizeStats()
    out: list[Example] = []
    for conv in conversations:
        record = conv if isinstance(conv, dict) else {"messages": conv}
        examples, st = tokenize_record(tok, record, max_length, train_on_prompt, mask_history)
        stats.add(st)
        out += examples
    return out, stats
