"""Tokenizers: a model folder's own, or the built-in character tokenizer (no hub needed).

The built-in tokenizer maps every printable ASCII character and newline to one
token, plus ChatML-style specials, and carries its own chat template. It is
what the embedded default run and the tests use.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config.llamafactory import LF_TEMPLATES, template_problem
from ..core.errors import UserError
from ..model.hfconfig import check_folder_model_type
from .render import OPEN_END

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML. A system message is optional; add_generation_prompt opens an assistant turn. Tools (a list of
# function schemas) go into the system turn; assistant tool calls render as <tool_call> JSON blocks and
# tool results as `tool` turns. Without tools it is plain ChatML.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if not (tools and loop.first and m['role'] == 'system') %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}"
    "<tool_call>\n{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Llama 3 header style, for tokenizers that carry its special tokens but no template (LLaMA-Factory's llama3
# layout; its tool prompt is not reproduced: tool schemas go into the system turn as JSON lines).
LLAMA3_TEMPLATE = (
    "{{ bos_token or '' }}"
    # an empty tool list and no system message: an empty system turn, as LLaMA-Factory's llama3 lays it out
    "{% if tools is defined and tools is not none and tools | length == 0 "
    "and not (messages and messages[0]['role'] == 'system') %}"
    "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>{% endif %}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}"
    "{% if not (tools and loop.first and m['role'] == 'system') %}"
    "<|start_header_id|>{{ 'ipython' if m['role'] == 'tool' else m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}"
    "{{ {'name': c['function']['name'], 'parameters': c['function']['arguments']} | tojson }}"
    "{% endfor %}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# LLaMA-Factory's template-free formats, `empty` and `default`: the system prompt (with the tool schemas as JSON
# lines, if any) first, then each message's content. `empty` adds nothing between them, not even an end-of-turn
# marker after a reply (OPEN_END tells render.py's check that this is meant); `default` writes
# "System: ...", "Human: ...\nAssistant:" and ends each turn with the tokenizer's EOS and a newline (a
# record with a tool list, even an empty one, gets a "System: " turn, as in LLaMA-Factory). Tool results
# are written like user turns and tool calls as "Action: NAME\nAction Input: ARGUMENTS", one per line, as
# LLaMA-Factory formats them.
_SYSTEM_AND_TOOLS = (
    "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] or '' %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- set declared %}{{ system }}{% if tools %}{% if system %}{{ '\n\n' }}{% endif %}"
    "{% for t in tools %}{{ t | tojson }}{{ '\n' }}{% endfor %}{% endif %}{% endset %}"
)
_CALLS = (
    "{%- for c in m.get('tool_calls') or [] %}{% if not loop.first or m['content'] %}{{ '\n' }}{% endif %}"
    "Action: {{ c['function']['name'] }}{{ '\n' }}Action Input: "
    "{% if c['function']['arguments'] is string %}{{ c['function']['arguments'] }}"
    "{% else %}{{ c['function']['arguments'] | tojson }}{% endif %}{% endfor %}"
)
EMPTY_TEMPLATE = (
    OPEN_END + _SYSTEM_AND_TOOLS + "{{ declared }}"
    "{%- for m in rest %}{{ m['content'] or '' }}{% if m['role'] == 'assistant' %}" + _CALLS + "{% endif %}"
    "{%- endfor %}"
)
DEFAULT_TEMPLATE = (
    _SYSTEM_AND_TOOLS + "{%- if declared or (tools is defined and tools is not none) %}"
    "System: {{ declared }}{{ eos_token }}{{ '\n' }}{% endif %}"
    "{%- for m in rest %}{%- if m['role'] == 'assistant' %}{{ m['content'] or '' }}" + _CALLS
    + "{{ eos_token }}{{ '\n' }}{%- else %}Human: {{ m['content'] or '' }}{{ eos_token }}{{ '\n' }}Assistant:"
    "{%- endif %}{%- endfor %}"
)

TEMPLATES = {"chatml": CHAT_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "empty": EMPTY_TEMPLATE,
             "default": DEFAULT_TEMPLATE}


def apply_template(tok: PreTrainedTokenizerBase, name: str) -> None:
    """data.template: 'auto' keeps the tokenizer's own chat template (ChatML if it has none); a LLaMA-Factory name
    (lfconfig.LF_TEMPLATES) uses fsdptrain's ChatML / Llama 3 template (chatml, llama3) or the tokenizer's own
    template, which must be of the named family, with LLaMA-Factory's default system prompt where it has one."""
    if name == "auto":
        if not tok.chat_template:
            tok.chat_template = CHAT_TEMPLATE
        return
    lf = LF_TEMPLATES.get(name)
    if lf is None:
        raise UserError(f"data.template: {template_problem(name)}")
    if lf.builtin:
        tok.chat_template = TEMPLATES[lf.builtin]
        return
    own = tok.chat_template or CHAT_TEMPLATE
    if lf.marker not in own:
        raise UserError(f"data.template={name}: the tokenizer's chat template is not {lf.family}'s (it has no "
                        f"{lf.marker}); set model.tokenizer to a {lf.family} tokenizer folder, or data.template=auto "
                        "to use this tokenizer's own template")
    if lf.no_empty_think:
        own = without_empty_think(own)
    if lf.system_with_tools:
        own = with_system_for_tools(own)
    tok.chat_template = with_default_system(own, lf.system) if lf.system else own


EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def without_empty_think(template: str) -> str:
    """`template` with the empty `<think>` block that hybrid-reasoning ChatML templates (Qwen3's) write before a
    reply left out, as LLaMA-Factory's non-reasoning templates (qwen, qwen3_nothink) format replies. Reasoning
    the data holds is kept: only the empty block goes."""
    return (f"{{%- filter replace({json.dumps(EMPTY_THINK)}, {json.dumps(EMPTY_THINK.split('<think>')[0])}) %}}"
            + template + "{% endfilter %}")


def with_default_system(template: str, system: str) -> str:
    """`template` with `system` put first in a conversation that has no system message (LLaMA-Factory's
    default_system). Templates that add the same prompt themselves (Qwen2.5's) render the same text."""
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system)}}}] + messages %}}"
            "{%- endif %}" + template)


def with_system_for_tools(template: str) -> str:
    """`template` with an empty system message put first in a conversation that has a tool list (even an empty
    one) but no system message: LLaMA-Factory writes the system turn whenever a record has tools, the tool text
    after the (empty) system text, and ChatML templates then render it the same way."""
    return ("{%- if tools is defined and tools is not none and (not messages or messages[0]['role'] != 'system') %}"
            "{%- set messages = [{'role': 'system', 'content': ''}] + messages %}{%- endif %}" + template)


def build_char_tokenizer():
    """A character-level fast tokenizer with ChatML specials and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 94 visible + space + newline
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=1_000_000,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(tokenizer_path: Optional[str], model_path: Optional[str], trust_remote_code: bool = False):
    """model.tokenizer, else model.path if it holds a tokenizer, else the built-in one."""
    from transformers import AutoTokenizer

    candidates = [tokenizer_path] if tokenizer_path else []
    if not tokenizer_path and model_path and any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        candidates.append(model_path)
    if not candidates:
        return build_char_tokenizer()
    path = candidates[0]
    if not Path(path).is_dir():
        raise UserError(f"model.tokenizer: {path}: not a folder; point it at a Hugging Face tokenizer folder")
    if (Path(path) / "config.json").is_file():  # AutoTokenizer reads it too: its mistakes are one line, said first
        check_folder_model_type(Path(path))
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.tokenizer: {path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok
