"""Render conversations with the chat template and mask everything but the assistant's tokens.

Each assistant turn is located by rendering the conversation incrementally: the
text from "history + generation prompt" to "history + this turn" is the turn's
target (its content and end-of-turn marker); all other tokens get label -100.
This works with any template whose rendering of a prefix of the conversation
is a prefix of the full rendering, which we check (a template that rewrites
history, e.g. one that strips earlier reasoning, is refused with a hint to pick
a built-in one). The full text is tokenised once and cut at those character
boundaries via the fast tokenizer's offsets; if a token straddles a boundary,
each prefix is tokenised on its own instead.

Options: train_on_prompt trains every token; mask_history trains only the last
assistant turn. Truncation to cutoff_len follows LLaMA-Factory's rule per
(prompt, response) pair: a short response is kept whole and the prompt cut,
else a short prompt is kept and the response cut, else both shrink in
proportion; the prompt keeps its end (the turn header and the text nearest the
response). With mask_history the last pair gets the budget first. A document
(pretraining text) is split into cutoff_len chunks instead, every token a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


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
class TokenizeStats:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    split: int = 0  # extra rows made by cutting long documents into cutoff_len chunks
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
                f"truncated {self.truncated}, split documents into {self.split} extra rows, "
                f"dropped (no target token left) {self.dropped_no_target}, target tokens {self.target_tokens}")


class TemplateError(ValueError):
    """The chat template re-renders earlier turns differently once later turns are added."""


def _render(tok: PreTrainedTokenizerBase, messages: list[dict], tools: Optional[list], generation: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation)


def segments(tok: PreTrainedTokenizerBase, messages: list[dict],
             tools: Optional[list] = None) -> list[tuple[list[int], bool]]:
    """The conversation's tokens as consecutive (ids, is_assistant_turn) runs."""
    texts: list[str] = []
    plan = []  # per message: (index of its full rendering, index of its generation prompt or -1)
    for i, m in enumerate(messages):
        gen = -1
        if m["role"] == "assistant":
            texts.append(_render(tok, messages[:i], tools, True))
            gen = len(texts) - 1
        texts.append(_render(tok, messages[: i + 1], tools, False))
        plan.append((len(texts) - 1, gen))
    if not texts:
        return []
    full = texts[-1]
    if any(not full.startswith(t) for t in texts):
        raise TemplateError("chat template is not prefix-stable")
    fast = _segments_by_offsets(tok, full, plan, texts)
    return fast if fast is not None else _segments_by_prefixes(tok, plan, texts)


def _segments_by_offsets(tok: PreTrainedTokenizerBase, full: str, plan,
                         texts: list[str]) -> Optional[list[tuple[list[int], bool]]]:
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
    for full_i, gen_i in plan:
        cuts = ([(len(texts[gen_i]), False)] if gen_i >= 0 else []) + [(len(texts[full_i]), gen_i >= 0)]
        for char, is_target in cuts:
            k = at(char)
            if k is None or k < cur:
                return None
            out.append((ids[cur:k], is_target))
            cur = k
    return [(x, t) for x, t in out if x]


def _segments_by_prefixes(tok: PreTrainedTokenizerBase, plan, texts: list[str]) -> list[tuple[list[int], bool]]:
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    out: list[tuple[list[int], bool]] = []
    cur: list[int] = []
    for full_i, gen_i in plan:
        full = encoded[full_i]
        if full[: len(cur)] != cur:
            raise TemplateError("chat template is not prefix-stable")
        if gen_i >= 0:
            prompt = encoded[gen_i]
            if prompt[: len(cur)] != cur or full[: len(prompt)] != prompt:
                raise TemplateError("chat template is not prefix-stable")
            out += [(prompt[len(cur):], False), (full[len(prompt):], True)]
        else:
            out.append((full[len(cur):], False))
        cur = full
    return [(ids, t) for ids, t in out if ids]


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
                  mask_history: bool = False) -> tuple[Example, bool]:
    """(example, truncated) from segments: label masking and cutoff_len truncation."""
    last = max((i for i, (_, t) in enumerate(segs) if t), default=-1)
    pairs: list[tuple[list[int], list[int], bool]] = []  # (prompt ids, response ids, response trained)
    src: list[int] = []
    for i, (ids, is_target) in enumerate(segs):
        if is_target:
            pairs.append((src, ids, not mask_history or i == last))
            src = []
        else:
            src = src + ids
    if src:
        pairs.append((src, [], False))
    total = sum(len(s) + len(t) for s, t, _ in pairs)
    truncated = total > max_length
    if truncated:
        budget, kept = max_length, {}
        for k in (reversed(range(len(pairs))) if mask_history else range(len(pairs))):
            s, t, trained = pairs[k]
            if budget <= 0:
                kept[k] = ([], [], trained)
                continue
            ns, nt = infer_lengths(len(s), len(t), budget)
            kept[k] = (s[len(s) - ns:] if ns else [], t[:nt], trained)
            budget -= ns + nt
        pairs = [kept[k] for k in range(len(pairs))]
    input_ids: list[int] = []
    labels: list[int] = []
    for s, t, trained in pairs:
        input_ids += s + t
        labels += ((s if train_on_prompt else [IGNORE] * len(s))
                   + (t if trained or train_on_prompt else [IGNORE] * len(t)))
    return Example(input_ids, labels), truncated


def tokenize_conversation(tok: PreTrainedTokenizerBase, messages: list[dict], max_length: int,
                          tools: Optional[list] = None, train_on_prompt: bool = False,
                          mask_history: bool = False) -> tuple[Example, bool]:
    """(example, truncated). Labels train only assistant turns (content + end marker) unless told otherwise."""
    return build_example(segments(tok, messages, tools), max_length, train_on_prompt, mask_history)


def tokenize_text(tok: PreTrainedTokenizerBase, text: str, max_length: int) -> list[Example]:
    """A pretraining document: its tokens + end-of-sequence, in chunks of max_length, every token trained."""
    ids = tok(text)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return [Example(ids[i:i + max_length], ids[i:i + max_length]) for i in range(0, len(ids), max_length)]


def tokenize_record(tok: PreTrainedTokenizerBase, record: dict, max_length: int, train_on_prompt: bool = False,
                    mask_history: bool = False) -> tuple[list[Example], TokenizeStats]:
    """One common-form record (see formats.py) -> examples (none if it has no target left) and its counts."""
    st = TokenizeStats(read=1)
    if "text" in record:
        chunks = tokenize_text(tok, record["text"], max_length)
        st.split = len(chunks) - 1
        examples = chunks
    else:
        ex, truncated = tokenize_conversation(tok, record["messages"], max_length, record.get("tools"),
                                              train_on_prompt, mask_history)
        st.truncated = int(truncated)
        examples = [ex]
    kept = [e for e in examples if e.n_targets > 0]
    st.dropped_no_target = len(examples) - len(kept)
    st.kept = len(kept)
    st.target_tokens = sum(e.n_targets for e in kept)
    return kept, st


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
