"""Check a chat template on a fixed set of conversations, from the tokens up: what it trains, what it refuses.

The conversations cover what data sets hold: one turn; a system prompt and two turns; tools with a call, its
result and an answer; reasoning (`<think>`) in two turns. Every message text is distinct, so the check can tell
them apart in the trained tokens. For each conversation the template either renders it (through the same
path as training: render.py and encode.py) and then, decoded from the examples' tokens:
  - each assistant turn is trained exactly once, as its own span of targets, in order;
  - that span holds the turn's answer, reasoning and tool calls (name and every argument), then an end-of-turn
    marker (text after the last of them), and no other message's text;
  - the prompt holds every system, user and tool message and the declared tool;
or it is refused with a one-line TemplateError. Anything else is a failure (`problems`). `table` gives the
Markdown table of docs/templates.md; tests/test_templates.py runs every template in ../shared/chat_templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .encode import IGNORE, conversation_examples
from .formats import link_tool_results, standard_tool
from .render import THINK, TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEATHER = {"name": "get_weather", "description": "Look up the current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                            "unit": {"type": "string"}},
                          "required": ["city"]}}


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS: dict[str, tuple[list[dict], Optional[list]]] = {
    "plain": ([{"role": "user", "content": "Name a primary colour."},
               {"role": "assistant", "content": "Red is a primary colour."}], None),
    "system, 2 turns": ([{"role": "system", "content": "You answer in one short sentence."},
                         {"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "The capital of France is Paris."},
                         {"role": "user", "content": "And the capital of Italy?"},
                         {"role": "assistant", "content": "The capital of Italy is Rome."}], None),
    "tools": ([{"role": "user", "content": "How warm is it in Lisbon right now?"},
               {"role": "assistant", "content": "", "tool_calls": [_call("get_weather",
                                                                         {"city": "Lisbon", "unit": "celsius"})]},
               {"role": "tool", "content": '{"temperature": 23}'},
               {"role": "assistant", "content": "It is 23 degrees Celsius in Lisbon."}], [WEATHER]),
    "reasoning": ([{"role": "user", "content": "What is 6 times 7?"},
                   {"role": "assistant", "content": "<think>\nSix sevens make forty-two.\n</think>\n\nIt is 42."},
                   {"role": "user", "content": "And 8 times 9?"},
                   {"role": "assistant",
                    "content": "<think>\nEight nines make seventy-two.\n</think>\n\nIt is 72."}], None),
}

LLAMA_TEMPLATES = ("llama", "firefunction", "functionary", "Hermes-2-Pro", "Hermes-3")
QWEN3_TEMPLATES = ("Qwen3", "QwQ")


def tokenizer_for(template_file: str) -> str:
    """Which of ../shared/tokenizers a template is paired with: its model's vocabulary where we have it."""
    name = Path(template_file).stem
    if any(k.lower() in name.lower() for k in LLAMA_TEMPLATES):
        return "llama3.1"
    if any(k in name for k in QWEN3_TEMPLATES):
        return "qwen3"
    return "qwen2.5"


@dataclass
class Outcome:
    examples: int = 0  # examples the conversation became (0: refused)
    refused: Optional[str] = None  # the TemplateError's message
    problems: Optional[list[str]] = None  # what the check found wrong (empty: fine)

    def cell(self) -> str:
        if self.refused is not None:
            return f"refused: {self.refused}"
        if self.problems:
            return "WRONG: " + "; ".join(self.problems)
        return "ok" if self.examples == 1 else f"ok ({self.examples} examples)"


def check(tok: PreTrainedTokenizerBase, messages: list[dict], tools: Optional[list]) -> Outcome:
    messages = link_tool_results(messages)
    tools = [standard_tool(t) for t in tools] if tools else None
    try:
        made = conversation_examples(tok, messages, 100_000, tools)
    except TemplateError as e:
        return Outcome(refused=str(e))
    problems: list[str] = []
    spans = [(ex, run) for ex, _ in made for run in _trained_runs(ex.labels)]
    assistants = [m for m in messages if m["role"] == "assistant"]
    if len(spans) != len(assistants):
        problems.append(f"{len(spans)} trained spans for {len(assistants)} assistant turns")
    for n, (m, (ex, (a, b))) in enumerate(zip(assistants, spans), 1):
        trained = tok.decode(ex.input_ids[a:b])
        problems += [f"turn {n}: {p}" for p in _reply_problems(m, trained)]
        others = [p for o in messages if o is not m for p in ([_plain(o.get("content")).strip()] + _pieces(o))]
        foreign = [t for t in others if t and not any(t in p for p in _pieces(m)) and t in trained]
        if foreign:
            problems.append(f"turn {n}: trains other text ({foreign[0]!r})")
    whole = "".join(tok.decode(ex.input_ids) for ex, _ in made)
    for m in messages:
        if m["role"] != "assistant" and _plain(m.get("content")).strip() not in whole:
            problems.append(f"{m['role']} message missing")
    for t in tools or []:
        if t["function"]["name"] not in tok.decode(made[0][0].input_ids):
            problems.append("tool declaration missing")
    return Outcome(examples=len(made), problems=problems)


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, x in enumerate(list(labels) + [IGNORE]):
        if x != IGNORE and start is None:
            start = i
        elif x == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _plain(value) -> str:
    return value if isinstance(value, str) else ""


def _pieces(m: dict) -> list[str]:
    """The texts a trained assistant turn must hold: reasoning, answer, each call's name and argument values."""
    content = _plain(m.get("content"))
    out = [r.strip() for r in THINK.findall(content)] + [THINK.sub("", content).strip()]
    out.append(_plain(m.get("reasoning_content")).strip())
    for c in m.get("tool_calls") or []:
        out.append(c["function"]["name"])
        out += [str(v) for v in c["function"]["arguments"].values()]
    return [p for p in out if p]


def _reply_problems(m: dict, trained: str) -> list[str]:
    pieces = _pieces(m)
    missing = [p for p in pieces if p not in trained]
    if missing:
        return [f"{missing[0]!r} not trained"]
    last = max(trained.rfind(p) + len(p) for p in pieces)
    return [] if trained[last:].strip() else ["no end-of-turn marker trained"]


def check_template(tok: PreTrainedTokenizerBase) -> dict[str, Outcome]:
    return {name: check(tok, msgs, tools) for name, (msgs, tools) in CONVERSATIONS.items()}


def table(results: dict[str, tuple[str, dict[str, Outcome]]]) -> str:
    """Markdown: one row per template (file name -> (tokenizer, outcomes))."""
    head = ["template", "tokenizer", *CONVERSATIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in sorted(results, key=str.lower):
        tokenizer, outcomes = results[name]
        cells = [o.cell().replace("|", "\\|") for o in outcomes.values()]
        lines.append("| " + " | ".join([Path(name).stem, tokenizer, *cells]) + " |")
    return "\n".join(lines) + "\n"


def run_all(template_dir: Path, tokenizer_dir: Path,
            loaded: Optional[dict[str, PreTrainedTokenizerBase]] = None) -> dict[str, tuple[str, dict[str, Outcome]]]:
    """Every *.jinja in template_dir with its paired tokenizer (each loaded once; `loaded`: already loaded ones,
    whose chat templates are restored afterwards)."""
    from transformers import AutoTokenizer

    loaded = loaded if loaded is not None else {}
    before = {k: t.chat_template for k, t in loaded.items()}
    out = {}
    try:
        for path in sorted(template_dir.glob("*.jinja")):
            which = tokenizer_for(path.name)
            if which not in loaded:
                loaded[which] = AutoTokenizer.from_pretrained(tokenizer_dir / which)
            tok = loaded[which]
            tok.chat_template = path.read_text()
            out[path.name] = (which, check_template(tok))
    finally:
        for k, template in before.items():
            loaded[k].chat_template = template
    return out
