"""Render a conversation with its chat template, find each assistant turn in the text, and check nothing was lost.

Each assistant turn i is located by rendering "the messages before it + generation prompt" (its prompt) and
"the messages up to it" (done): the text between the two is the turn's target (content, tool calls, end-of-turn
marker). A template whose generation prompt is not a prefix of the rendered turn (DeepSeek-R1 distills open
`<think>` in the generation prompt) has the turn start where the two texts part.

Turns follow each other in one example while each prompt extends the text before it. A template that renders
earlier turns differently once later ones are added (Qwen3, QwQ and DeepSeek-R1 distills drop the reasoning of
earlier replies, Mistral moves the system prompt to the last user turn) starts a new example at that turn: the
turn is trained against its own prompt, as the model will see it, and nothing is refused or lost; a
prefix-stable template gives one example per conversation as before.

The rendered text is checked against the messages, so a template can never drop data silently: every assistant
reply (its reasoning and its answer) and every tool call (name and arguments) must be inside its turn's target,
followed by an end-of-turn marker; every system, user and tool message and every declared tool (name,
description) must be in the prompt. Where the plain rendering fails, two standard adaptations are tried: tool-call
arguments as a JSON string instead of a dict (some templates print them as given), the replies' reasoning
kept as written where the template strips it from every reply (it would otherwise never be trained), and the
system prompt put before the first user message for templates without a system role. What still
fails raises TemplateError naming the problem; the caller turns it into one line with a fix.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

THINK = re.compile(r"<think>(.*?)</think>", re.S)
PLACEHOLDER = "\x1e{}\x1f"  # stands for an assistant reply while its template renders (see _substituted)
# A template holding this comment writes messages with nothing between them on purpose (LLaMA-Factory's `empty`
# format: the texts concatenated): no end-of-turn marker is required after a reply, and encode.py tokenises each
# message on its own, as LLaMA-Factory does.
OPEN_END = "{#- fsdptrain: replies end with nothing #}"


class TemplateError(ValueError):
    """The chat template cannot render this conversation faithfully; the message says what it lost."""


@dataclass
class Chain:
    """One example's rendered text and where its runs end (run end, is an assistant turn)."""

    text: str
    cuts: list[tuple[int, bool]]


def render(tok: PreTrainedTokenizerBase, messages: list[dict], tools: Optional[list], generation: bool) -> str:
    if not messages:
        return ""
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                       add_generation_prompt=generation)
    except Exception as e:  # the template's raise_exception, or a message shape it cannot handle
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TemplateError(f"fails on this conversation ({first})") from None


def render_chains(tok: PreTrainedTokenizerBase, messages: list[dict], tools: Optional[list] = None,
                  last_only: bool = False) -> list[Chain]:
    """The conversation as rendered examples, checked (see the module docstring); raises TemplateError.

    The conversation is rendered as given, then with the adaptations that apply (ADAPTATIONS), one at a time,
    then two at a time, ...; the first rendering that passes the check is used, and its adaptations are tried
    first for the next conversation with the same template. The error is the plain rendering's problem.
    last_only: only the example holding the last assistant turn (mask_history trains nothing else).
    """
    usable = [a for a in ADAPTATIONS if ADAPTATIONS[a][0](messages, tools, tok)]
    tried = [c for k in range(len(usable) + 1) for c in itertools.combinations(usable, k)]
    known = _WORKED.get(hash(tok.chat_template))
    if known in tried:
        tried.remove(known)
        tried.insert(0, known)
    first_problem: Optional[TemplateError] = None
    for combo in tried:
        variant = _Variant(messages, tools, {}, "")
        for name in combo:
            variant = ADAPTATIONS[name][1](variant, tok)
        try:
            chains = _chains(tok, variant)
            _check(messages, tools, chains, OPEN_END not in (tok.chat_template or ""))
        except TemplateError as e:
            first_problem = first_problem or e
            continue
        _WORKED[hash(tok.chat_template)] = combo
        return chains[-1:] if last_only else chains
    raise first_problem  # type: ignore[misc]


@dataclass
class _Variant:
    messages: list[dict]
    tools: Optional[list]
    replies: dict[str, str]  # placeholder -> the reply it stands for (empty: rendered as given)
    eos: str  # put after every reply ("": nothing)


def _has_dict_arguments(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return any(isinstance(c["function"].get("arguments"), dict) for m in messages for c in m.get("tool_calls") or [])


def _string_arguments(v: _Variant, tok: Any) -> _Variant:
    """Tool-call arguments as a JSON string (templates that print them as given)."""
    def one(m: dict) -> dict:
        if not m.get("tool_calls"):
            return m
        calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                               ensure_ascii=False)}}
                 if isinstance(c["function"].get("arguments"), dict) else c for c in m["tool_calls"]]
        return {**m, "tool_calls": calls}
    return _Variant([one(m) for m in v.messages], v.tools, v.replies, v.eos)


def _json_results(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return any(m["role"] == "tool" and isinstance(_json(m.get("content")), (dict, list)) for m in messages)


def _parsed_results(v: _Variant, tok: Any) -> _Variant:
    """Tool results that are JSON passed as objects (templates that tojson every result, e.g. Llama 3.1's,
    would print a string result as one quoted, escaped string)."""
    msgs = [{**m, "content": _json(m.get("content"))}
            if m["role"] == "tool" and isinstance(_json(m.get("content")), (dict, list)) else m for m in v.messages]
    return _Variant(msgs, v.tools, v.replies, v.eos)


def _has_reasoning(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return any(m["role"] == "assistant" and (THINK.search(_plain(m.get("content")))
                                             or _plain(m.get("reasoning_content")).strip()) for m in messages)


def _substituted(v: _Variant, tok: Any) -> _Variant:
    """Replies with reasoning replaced by placeholders, put back after rendering: for templates that strip
    `<think>` from every reply (DeepSeek-R1 distills), so the reasoning is trained as written."""
    out, replies = [], dict(v.replies)
    for i, m in enumerate(v.messages):
        if m["role"] == "assistant" and THINK.search(_plain(m.get("content"))):
            key = PLACEHOLDER.format(i)
            replies[key] = m["content"]
            m = {**m, "content": key}
        out.append(m)
    return _Variant(out, v.tools, replies, v.eos)


def _leading_system(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user"


def _system_in_user(v: _Variant, tok: Any) -> _Variant:
    """The system prompt put before the first user message, for templates without a system role (Gemma 2)."""
    system, user = v.messages[0], v.messages[1]
    merged = "\n\n".join(p for p in (_plain(system.get("content")), _plain(user.get("content"))) if p)
    return _Variant([{**user, "content": merged}] + v.messages[2:], v.tools, v.replies, v.eos)


def _no_tools(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return not tools


def _empty_tools(v: _Variant, tok: Any) -> _Variant:
    """An empty tool list instead of none (tool-use templates that loop over `tools` unconditionally)."""
    return _Variant(v.messages, [], v.replies, v.eos)


def _has_eos(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return bool(getattr(tok, "eos_token", None))


def _eos_after_reply(v: _Variant, tok: Any) -> _Variant:
    """The tokenizer's end-of-sequence token after every reply, for templates that close a reply with nothing
    (GLM's: the next turn's header ends it), as LLaMA-Factory does for such templates: the model learns to stop."""
    return _Variant(v.messages, v.tools, v.replies, tok.eos_token)


def _has_reasoning_field(messages: list[dict], tools: Optional[list], tok: Any) -> bool:
    return any(m["role"] == "assistant" and _plain(m.get("reasoning_content")).strip() for m in messages)


def _inline_reasoning(v: _Variant, tok: Any) -> _Variant:
    """A reply's separate reasoning_content put in front of its content as a <think> block (templates that
    know only the content would drop it)."""
    out = []
    for m in v.messages:
        r = _plain(m.get("reasoning_content")).strip() if m["role"] == "assistant" else ""
        if r:
            m = {k: x for k, x in m.items() if k != "reasoning_content"}
            m["content"] = f"<think>\n{r}\n</think>\n\n{_plain(m.get('content')).lstrip()}"
        out.append(m)
    return _Variant(out, v.tools, v.replies, v.eos)


# name -> (applies to this conversation, adapt); tried in this order
ADAPTATIONS = {
    "arguments as a JSON string": (_has_dict_arguments, _string_arguments),
    "tool results as JSON objects": (_json_results, _parsed_results),
    "reasoning_content as a <think> block": (_has_reasoning_field, _inline_reasoning),
    "reasoning kept as written": (_has_reasoning, _substituted),
    "system prompt in the first user turn": (_leading_system, _system_in_user),
    "an empty tool list": (_no_tools, _empty_tools),
    "EOS after each reply": (_has_eos, _eos_after_reply),
}
_WORKED: dict[int, tuple[str, ...]] = {}  # chat template (hash) -> the adaptations that last worked with it


def _json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


def _put_back(text: str, replies: dict[str, str]) -> str:
    for key, reply in replies.items():
        text = text.replace(key, reply)
    return text


def _chains(tok: PreTrainedTokenizerBase, v: _Variant) -> list[Chain]:
    messages = v.messages
    chains: list[Chain] = []
    raw, out, cuts = "", "", []  # the template's text so far, the example's (raw plus inserted EOS), run ends
    previous = -1  # index of the last assistant turn done

    def draw(msgs: list[dict], generation: bool) -> str:
        return _put_back(render(tok, msgs, v.tools, generation), v.replies)

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = draw(messages[:i], True)
        if not prompt.startswith(raw):  # earlier turns look different now: this turn starts a new example
            chains.append(Chain(out, cuts))
            raw, out, cuts = "", "", []
        floor = len(raw)
        for j in range(previous + 1, i):  # where each message in the prompt ends (runs of their own)
            before = draw(messages[:j + 1], False)
            if prompt.startswith(before) and len(before) > floor:
                floor = len(before)
                cuts.append((len(out) + floor - len(raw), False))
        done = draw(messages[:i + 1], False)
        start = len(prompt) if done.startswith(prompt) else _common_prefix(prompt, done)
        if start < floor:
            raise TemplateError(f"renders assistant turn {_turn_no(messages, i)} over the messages before it "
                                "(its text does not follow the prompt)")
        cuts.append((len(out) + start - len(raw), False))
        out += done[len(raw):] + v.eos
        cuts.append((len(out), True))
        raw, previous = done, i
    if cuts:
        chains.append(Chain(out, cuts))
    return chains


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _turn_no(messages: list[dict], i: int) -> int:
    return sum(1 for m in messages[:i + 1] if m["role"] == "assistant")


# ----------------------------------------------------------------------------- checking the rendered text


def _check(messages: list[dict], tools: Optional[list], chains: list[Chain], end_marker: bool = True) -> None:
    """TemplateError unless every message, reasoning, tool call and tool declaration is where it belongs (and,
    with end_marker, something follows each reply: its end-of-turn marker)."""
    # (text, target start, target end, first turn of its example) per assistant turn
    turns = [(c.text, c.cuts[k - 1][0], end, k == min(x for x, (_, t) in enumerate(c.cuts) if t))
             for c in chains for k, (end, is_target) in enumerate(c.cuts) if is_target]
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    previous = -1
    for n, (i, (text, start, end, first)) in enumerate(zip(assistants, turns), 1):
        prompt, target = text[:start], text[start:end]
        for j in range(previous + 1, i):
            content = _plain(messages[j].get("content")).strip()
            parsed = _json(content) if messages[j]["role"] == "tool" else None
            forms = [content] + ([json.dumps(parsed), json.dumps(parsed, ensure_ascii=False)]
                                 if isinstance(parsed, (dict, list)) else [])
            if content and not any(f in prompt for f in forms):  # a JSON result may be re-serialised
                raise TemplateError(f"drops or changes {messages[j]['role']} messages "
                                    f"(the {messages[j]['role']} text before assistant turn {n} is not rendered)")
        if first:
            _check_tools(tools, prompt)
        _check_reply(messages[i], target, n, end_marker)
        previous = i


def _check_tools(tools: Optional[list], prompt: str) -> None:
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict):
            continue
        for part in (fn.get("name"), fn.get("description")):
            if isinstance(part, str) and part.strip() and part.strip() not in prompt:
                raise TemplateError(f"does not render the tool declarations (tool '{fn.get('name')}' is missing "
                                    "from the prompt)")


def _check_reply(m: dict, target: str, n: int, end_marker: bool = True) -> None:
    content = _plain(m.get("content"))
    last = 0
    reasoning = [r.strip() for r in THINK.findall(content)] + [_plain(m.get("reasoning_content")).strip()]
    for r in reasoning:
        if r:
            at = target.find(r)
            if at < 0:
                raise TemplateError(f"drops the reasoning (<think>) of assistant turn {n}")
            last = max(last, at + len(r))
    answer = THINK.sub("", content).strip()
    if answer:
        at = target.rfind(answer)
        if at < 0:
            raise TemplateError(f"drops or changes the reply of assistant turn {n}")
        last = max(last, at + len(answer))
    for c in m.get("tool_calls") or []:
        fn = c["function"]
        at = target.find(fn["name"])
        missing = [alts[0] for alts in _leaves(fn.get("arguments")) if not any(a in target for a in alts)]
        if at < 0 or missing:
            what = f"'{fn['name']}'" + (f" (argument text {missing[0]!r})" if at >= 0 else "")
            raise TemplateError(f"does not render tool calls (assistant turn {n}'s call {what} is missing)")
        last = max([last, at + len(fn["name"])] + [target.rfind(a) + len(a) for alts in _leaves(fn.get("arguments"))
                                                    for a in alts if a in target])
    if end_marker and not target[last:].strip():
        raise TemplateError(f"puts no end-of-turn marker after assistant turn {n}")


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in value if isinstance(p, dict))
    return str(value)


def _leaves(value: Any) -> Iterator[tuple[str, ...]]:
    """What must appear of a tool call's arguments: each key and scalar, with the spellings templates use."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            yield from _leaves(parsed)
        elif value.strip():
            yield (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1])
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(str(k))
            yield from _leaves(v) if not isinstance(v, str) else _leaves_str(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v) if not isinstance(v, str) else _leaves_str(v)
    elif isinstance(value, bool):
        yield ("true", "True")
    elif value is None:
        yield ("null", "None")
    else:
        yield (json.dumps(value), repr(value), str(value))


def _leaves_str(v: str) -> Iterator[tuple[str, ...]]:
    """A string value inside arguments (not parsed again as JSON)."""
    if v.strip():
        yield (v, json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1])
