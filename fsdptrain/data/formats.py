"""Convert LLaMA-Factory record layouts into one common form.

Formats (LLaMA-Factory's `formatting` field, plus plain text):
  - alpaca: instruction/input/output columns, optional system and history
    ([[prompt, response], ...], whose responses train too);
  - sharegpt: a list of {from, value} turns with configurable tags; human and
    observation turns sit at odd positions, gpt and function_call at even ones;
    a leading system turn becomes the system prompt; optional tools column;
  - openai: a list of {role, content} messages (system/user/assistant/tool,
    assistant tool_calls in OpenAI's form);
  - text: one document per record (pretraining), a `text` column or
    LLaMA-Factory's `columns: {prompt: text}`.

Every conversation becomes {"messages": [{"role", "content", ["tool_calls"]}],
"tools": list | None}, roles system/user/assistant/tool, which is what chat
templates take (tool schemas in the HF/OpenAI form, {"type": "function",
"function": {...}}, whatever form the data has); a document becomes {"text": str}. A preference pair (a data set with
`ranking: true`) becomes {"messages": the prompt (ending with a user or tool turn), "chosen": message,
"rejected": message, "tools"}: alpaca takes `chosen`/`rejected` columns of text, sharegpt and openai a
`conversations` list that ends with the prompt plus `chosen`/`rejected` messages. A KTO example (a data set
whose columns map `kto_tag`, as LLaMA-Factory's kto_en_demo) becomes {"messages": the prompt, "response": the
last assistant message, "desirable": the record's tag (a JSON bool), "tools"}. A record a format cannot
use (missing column) is an error naming the record; a record without any text
(all fields null or blank: "empty") and a sharegpt/openai conversation with
broken role order are skipped and counted under their reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.errors import UserError

FORMATS = ("alpaca", "sharegpt", "openai", "text")

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                  "system": None, "tools": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None}
OPENAI_COLUMNS = {"messages": "messages", "system": None, "tools": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class Spec:
    """One data set to read: where it is and how its records are laid out."""

    name: str
    files: list[str]
    formatting: str = "alpaca"
    columns: dict = field(default_factory=dict)  # LLaMA-Factory's columns mapping (user-given part)
    tags: dict = field(default_factory=dict)
    num_samples: Optional[int] = None
    hub: Optional[dict] = None  # {"path", "subset", "split"} for a hub data set
    saved: bool = False  # files[0] is a `datasets.save_to_disk` folder
    ranking: bool = False  # preference pairs (dataset_info.json `ranking: true`)

    @property
    def feedback(self) -> bool:
        """KTO data: each record tagged desirable or not (LLaMA-Factory's `kto_tag` column)."""
        return bool(self.columns.get("kto_tag"))

    def resolved_columns(self) -> dict:
        base = {"alpaca": ALPACA_COLUMNS, "sharegpt": SHAREGPT_COLUMNS, "openai": OPENAI_COLUMNS,
                "text": {"prompt": "text"}}[self.formatting]
        pairs = {"chosen": "chosen", "rejected": "rejected"} if self.ranking else {}
        return {**base, **pairs, **self.columns}

    def resolved_tags(self) -> dict:
        return {**(OPENAI_TAGS if self.formatting == "openai" else SHAREGPT_TAGS), **self.tags}


@dataclass
class Converted:
    records: list[dict]
    where: list[str] = field(default_factory=list)  # where each kept record came from
    read: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count


KL_CHUNK = 1000  # LLaMA-Factory's preprocessing_batch_size default: its KL shift wraps within such a batch


def assign_kl_responses(records: list[dict]) -> None:
    """Give each KTO record (common form) its `kl_response`: the response of the record before it, within
    consecutive chunks of KL_CHUNK records, the first of a chunk taking the chunk's last, as LLaMA-Factory's
    feedback preprocessing does (a +1 shift of the responses within each map batch of the merged data sets).
    Deterministic: it depends on the records' order only (data sets in data.datasets order, each in file order
    after num_samples and max_samples)."""
    for start in range(0, len(records), KL_CHUNK):
        chunk = records[start:start + KL_CHUNK]
        for j, rec in enumerate(chunk):
            rec["kl_response"] = chunk[j - 1]["response"]


def detect_text(spec: Spec, first: Optional[dict]) -> bool:
    """LLaMA-Factory marks pretraining sets as alpaca with only `prompt` mapped (c4_demo: {prompt: text})."""
    if spec.formatting == "text":
        return True
    if spec.formatting != "alpaca" or spec.ranking:
        return False
    if spec.columns and set(spec.columns) == {"prompt"}:
        return True
    return not spec.columns and first is not None and "text" in first and "instruction" not in first


def convert(spec: Spec, records: list[dict], where: list[str]) -> Converted:
    """Records (with a `where` text per record for errors) -> common form, skipping and counting unusable ones.

    Skipped, each counted under its reason: a record with no text at all (every field null, empty or blank:
    "empty"), and conversations with broken role order. If every record is skipped that is an error.
    """
    out = Converted(records=[], read=len(records))
    if not records:
        return out
    if spec.ranking:
        fn = _alpaca_pair if spec.formatting == "alpaca" else _conversation_pair
    elif spec.feedback:
        fn = _alpaca_feedback if spec.formatting == "alpaca" else _conversation_feedback
    else:
        fn = _document if detect_text(spec, records[0]) else _alpaca if spec.formatting == "alpaca" else _conversation
    for rec, loc in zip(records, where):
        conv, reason = fn(spec, rec, loc)
        if reason is None and _is_empty(conv):
            reason = "empty"
        if reason:
            out.skipped[reason] = out.skipped.get(reason, 0) + 1
            continue
        out.records.append(conv)
        out.where.append(loc)
    if not out.records:
        reasons = ", ".join(f"{n} {r}" for r, n in out.skipped.items())
        raise UserError(f"data set '{spec.name}': all {out.read} records were skipped ({reasons}); "
                        f"check its formatting ({spec.formatting}) and tags in dataset_info.json")
    return out


def _is_empty(conv: dict) -> bool:
    """No text to train on: a blank document, or a conversation whose every turn is blank (and calls no tool)."""
    if "text" in conv:
        return not conv["text"].strip()
    if "response" in conv:  # a KTO example: its response blank
        return not (conv["response"]["content"].strip() or conv["response"].get("tool_calls"))
    if "chosen" in conv:  # a pair: both responses blank
        return not any(m["content"].strip() or m.get("tool_calls") for m in (conv["chosen"], conv["rejected"]))
    return all(not m["content"].strip() and not m.get("tool_calls") for m in conv["messages"])


def _document(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    return {"text": _text(_column(spec, rec, spec.columns.get("prompt", "text"), loc, "prompt"))}, None


def _column(spec: Spec, rec: dict, col: str, loc: str, role: str) -> Any:
    if not isinstance(rec, dict):
        raise UserError(f"data set '{spec.name}': {loc}: expected a JSON object, got {type(rec).__name__}")
    if col not in rec:
        have = ", ".join(map(str, rec)) or "none"
        raise UserError(f"data set '{spec.name}' ({spec.formatting}): {loc}: missing column '{col}' "
                        f"(columns.{role}; record has: {have}); set columns in dataset_info.json")
    return rec[col]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _alpaca_prompt(spec: Spec, rec: dict, loc: str, cols: dict) -> tuple[list[dict], Optional[str]]:
    """The system, history and user messages of an alpaca record (everything before its response)."""
    prompt = _text(_column(spec, rec, cols["prompt"], loc, "prompt"))
    query = _text(rec.get(cols["query"])) if cols.get("query") else ""
    messages: list[dict] = []
    if cols.get("system") and rec.get(cols["system"]):
        messages.append({"role": "system", "content": _text(rec[cols["system"]])})
    history = rec.get(cols["history"]) if cols.get("history") else None
    for turn in history or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            return [], "malformed history"
        messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    user = "\n".join(part for part in (prompt, query) if part)
    return messages + [{"role": "user", "content": user}], None


def _alpaca(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    cols = spec.resolved_columns()
    messages, reason = _alpaca_prompt(spec, rec, loc, cols)
    response = _column(spec, rec, cols["response"], loc, "response")
    if isinstance(response, list):
        raise UserError(f"data set '{spec.name}': {loc}: column '{cols['response']}' holds a list "
                        "(preference/ranking data); mark the data set `ranking: true` in dataset_info.json and "
                        "train it with train.objective=dpo")
    if reason:
        return {}, reason
    messages.append({"role": "assistant", "content": _text(response)})
    return {"messages": messages, "tools": _tools(spec, rec, cols, loc)}, None


def _alpaca_pair(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    """A ranking alpaca record: instruction/input (system, history) as the prompt, chosen and rejected texts."""
    cols = spec.resolved_columns()
    messages, reason = _alpaca_prompt(spec, rec, loc, cols)
    replies = {}
    for side in ("chosen", "rejected"):
        value = _column(spec, rec, cols[side], loc, side)
        if not isinstance(value, str):
            raise UserError(f"data set '{spec.name}' (alpaca, ranking): {loc}: column '{cols[side]}' holds a JSON "
                            f"{type(value).__name__}, not the {side} response's text; fix the record or the "
                            "data set's columns")
        replies[side] = {"role": "assistant", "content": value}
    if reason:
        return {}, reason
    return {"messages": messages, **replies, "tools": _tools(spec, rec, cols, loc)}, None


def _kto_tag(spec: Spec, rec: dict, loc: str) -> bool:
    """A KTO record's tag: true (desirable) or false (undesirable), a JSON bool as LLaMA-Factory requires."""
    col = spec.columns["kto_tag"]
    value = _column(spec, rec, col, loc, "kto_tag")
    if not isinstance(value, bool):
        raise UserError(f"data set '{spec.name}' ({spec.formatting}, kto): {loc}: column '{col}' holds "
                        f"{json.dumps(value)[:40]}, not a JSON bool (true: desirable, false: undesirable); fix "
                        "the record")
    return value


def _alpaca_feedback(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    """A KTO alpaca record: instruction/input (system, history) as the prompt, the output as the response."""
    conv, reason = _alpaca(spec, rec, loc)
    desirable = _kto_tag(spec, rec, loc)
    if reason:
        return {}, reason
    return {"messages": conv["messages"][:-1], "response": conv["messages"][-1], "desirable": desirable,
            "tools": conv["tools"]}, None


def _conversation_feedback(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    """A KTO sharegpt/openai record: the conversation up to its last assistant turn is the prompt, that turn the
    response (LLaMA-Factory's kto_en_demo: `messages` and a `label`)."""
    conv, reason = _conversation(spec, rec, loc)
    desirable = _kto_tag(spec, rec, loc)
    if reason:
        return {}, reason
    return {"messages": conv["messages"][:-1], "response": conv["messages"][-1], "desirable": desirable,
            "tools": conv["tools"]}, None


def _tools(spec: Spec, rec: dict, cols: dict, loc: str) -> Optional[list]:
    raw = rec.get(cols["tools"]) if cols.get("tools") else None
    if raw in (None, "", []):
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"data set '{spec.name}': {loc}: column '{cols['tools']}' is not valid JSON") from None
    return [standard_tool(t) for t in (raw if isinstance(raw, list) else [raw])]


def standard_tool(tool: Any) -> Any:
    """A tool schema in the HF/OpenAI form chat templates expect: {"type": "function", "function": {...}}.

    Data sets (LLaMA-Factory's glaive demo among them) often hold the bare function schema ({"name",
    "description", "parameters"}); templates read tool["function"], so a bare schema would render as an empty
    declaration. A schema of another shape is passed on unchanged (the render check looks at what it can).
    """
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        return {**tool, "type": tool.get("type") or "function"}
    if isinstance(tool, dict) and "name" in tool:
        return {"type": "function", "function": tool}
    return tool


def _tool_calls(content: Any) -> Optional[list]:
    """A function_call turn's content ({"name", "arguments"} or a list of them) -> OpenAI tool_calls."""
    try:
        calls = json.loads(content) if isinstance(content, str) else content
    except json.JSONDecodeError:
        return None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        if not isinstance(c, dict) or "name" not in c:
            return None
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


def _turns(spec: Spec, rec: dict, loc: str) -> tuple[list[dict], Optional[str], int]:
    """A sharegpt/openai record's messages (system first), the reason to skip it (or None), its turn count."""
    cols, tags = spec.resolved_columns(), spec.resolved_tags()
    turns = _column(spec, rec, cols["messages"], loc, "messages")
    if not isinstance(turns, list):
        raise UserError(f"data set '{spec.name}': {loc}: column '{cols['messages']}' must be a list of turns")
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    messages: list[dict] = []
    system = _text(rec.get(cols["system"])) if cols.get("system") else ""
    if turns and isinstance(turns[0], dict) and turns[0].get(role_tag) == tags["system_tag"]:
        system = system or _text(turns[0].get(content_tag))
        turns = turns[1:]
    if system:
        messages.append({"role": "system", "content": system})
    odd = {tags["user_tag"]: "user", tags["observation_tag"]: "tool"}
    even = {tags["assistant_tag"]: "assistant", tags["function_tag"]: "function"}
    for i, turn in enumerate(turns):
        message, reason = _message(turn, odd if i % 2 == 0 else even, tags)
        if reason:
            return [], reason, len(turns)
        messages.append(message)
    return messages, None, len(turns)


def _message(turn: Any, allowed: dict, tags: dict) -> tuple[dict, Optional[str]]:
    """One sharegpt/openai turn as a message, if its role is one of `allowed` (tag -> role)."""
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    if not isinstance(turn, dict) or role_tag not in turn:
        return {}, "malformed turn"
    role = allowed.get(turn[role_tag])
    if role is None:
        return {}, "broken role order"
    content = turn.get(content_tag)
    calls = turn.get("tool_calls") if role == "assistant" else None  # OpenAI-style assistant tool calls
    if role == "function" or calls:
        calls = _tool_calls(content if role == "function" else [c.get("function", c) for c in calls])
        if calls is None:
            return {}, "function call is not JSON with a name"
        return {"role": "assistant", "content": "", "tool_calls": calls}, None
    message = {"role": role, "content": _text(content)}
    reasoning = turn.get("reasoning_content") if role == "assistant" else None
    if isinstance(reasoning, str) and reasoning.strip():  # OpenAI-style separate reasoning
        message["reasoning_content"] = reasoning
    return message, None


def _conversation(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    messages, reason, n_turns = _turns(spec, rec, loc)
    if reason:
        return {}, reason
    if not n_turns or n_turns % 2:
        return {}, "does not end with an assistant turn"
    return {"messages": link_tool_results(messages), "tools": _tools(spec, rec, spec.resolved_columns(), loc)}, None


def _conversation_pair(spec: Spec, rec: dict, loc: str) -> tuple[dict, Optional[str]]:
    """A ranking sharegpt/openai record: the conversation is the prompt (it ends with a user or tool turn), the
    chosen and rejected columns hold one assistant (or function call) message each."""
    cols, tags = spec.resolved_columns(), spec.resolved_tags()
    messages, reason, n_turns = _turns(spec, rec, loc)
    replies = {}
    for side in ("chosen", "rejected"):
        value = _column(spec, rec, cols[side], loc, side)
        if not isinstance(value, dict):
            raise UserError(f"data set '{spec.name}' ({spec.formatting}, ranking): {loc}: column '{cols[side]}' "
                            f"holds a JSON {type(value).__name__}, not one message "
                            f"({{\"{tags['role_tag']}\": ..., \"{tags['content_tag']}\": ...}}); fix the record")
        reply, why = _message(value, {tags["assistant_tag"]: "assistant", tags["function_tag"]: "function"}, tags)
        reason = reason or (f"{side} is not an assistant message" if why == "broken role order" else why)
        replies[side] = reply
    if reason:
        return {}, reason
    if n_turns % 2 == 0:
        return {}, "prompt does not end with a user turn"
    linked = link_tool_results(messages + [replies["chosen"]])
    return {"messages": linked[:-1], "chosen": linked[-1], "rejected": link_tool_results(
        messages + [replies["rejected"]])[-1], "tools": _tools(spec, rec, cols, loc)}, None


def link_tool_results(messages: list[dict]) -> list[dict]:
    """Give each tool call an id and each tool result the id and name of the call it answers, in order.

    Some templates require them (Mistral's: 9-character alphanumeric ids; others print the function's name on
    the result); data sets in LLaMA-Factory's layout have neither. Ids already there are kept.
    """
    pending: list[dict] = []
    n = 0
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                n += 1
                calls.append({**c, "id": c.get("id") or f"call{n:05d}"})
            pending = list(calls)
            m = {**m, "tool_calls": calls}
        elif m["role"] == "tool" and pending:
            call = pending.pop(0)
            m = {**m, "tool_call_id": m.get("tool_call_id") or call["id"], "name": m.get("name") or
                 call["function"]["name"]}
        out.append(m)
    return out
