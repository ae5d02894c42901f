"""Render conversations with the chat template and mask everything but the assistant's tokens.

Each assistant turn is located by rendering the conversation incrementally: the
tokens from "history + generation prompt" to "history + this turn" are the
turn's target (its content and end-of-turn marker); all other tokens get label
-100. This works with any template whose rendering of a prefix of the
conversation is a prefix of the full rendering, which we check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: label[t] is the target *at* position t (-100: not trained)

    @property
    def n_targets(self) -> int:
        # position 0 has nothing before it to predict from, so it is never a target
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class TokenizeStats:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    target_tokens: int = 0
    reasons: dict = field(default_factory=dict)


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    return list(ids)


def tokenize_conversation(tok, messages: list[dict], max_length: int) -> tuple[Example, bool]:
    """(example, truncated). Labels train only assistant turns (content + end marker)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            prompt = _render(tok, messages[:i], add_generation_prompt=True)
            full = _render(tok, messages[: i + 1], add_generation_prompt=False)
            if full[: len(input_ids)] != input_ids or full[: len(prompt)] != prompt[: len(full)]:
                raise ValueError("chat template is not prefix-stable; cannot locate assistant tokens")
            labels += [IGNORE] * (len(prompt) - len(input_ids)) + full[len(prompt):]
            input_ids = full
        else:
            full = _render(tok, messages[: i + 1], add_generation_prompt=False)
            if full[: len(input_ids)] != input_ids:
                raise ValueError("chat template is not prefix-stable; cannot locate assistant tokens")
            labels += [IGNORE] * (len(full) - len(input_ids))
            input_ids = full
    truncated = len(input_ids) > max_length
    return Example(input_ids[:max_length], labels[:max_length]), truncated


def tokenize_all(tok, conversations: list[list[dict]], max_length: int) -> tuple[list[Example], TokenizeStats]:
    stats = TokenizeStats()
    out = []
    for conv in conversations:
        stats.read += 1
        ex, truncated = tokenize_conversation(tok, conv, max_length)
        stats.truncated += int(truncated)
        if ex.n_targets == 0:
            stats.dropped_no_target += 1
            continue
        stats.kept += 1
        stats.target_tokens += ex.n_targets
        out.append(ex)
    return out, stats
