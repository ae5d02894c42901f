"""Every real chat template in ../shared/chat_templates trains exactly the assistant turns or is refused in one
line; the table in docs/templates.md is what this check gives; a template that cannot render the data's tool
calls stops the data set with one line naming data.template and a fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsdptrain.core.errors import UserError
from tests.helpers import REPO

SHARED = REPO.parent / "shared"
TEMPLATES = SHARED / "chat_templates"
TOKENIZERS = SHARED / "tokenizers"
needs_fixtures = pytest.mark.skipif(not TEMPLATES.is_dir(), reason=f"fixtures not found at {SHARED}")

# The families the issue names: every conversation renders right (tools only where the model has tool support).
MUST_WORK = ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen3-Coder", "Qwen3.5-4B", "Qwen-QwQ-32B",
             "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
             "meta-llama-Llama-3.3-70B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
             "Mistral-Small-3.2-24B-Instruct-2506", "google-gemma-4-31B-it", "ibm-granite-granite-4.0",
             "openai-gpt-oss-120b", "NVIDIA-Nemotron-Nano-v2"]
# Models without tool support in their template: everything else renders right, tools are refused.
NO_TOOLS = {"google-gemma-2-2b-it": "fails on this conversation (Conversation roles must alternate",
            "microsoft-Phi-3.5-mini-instruct": "does not render the tool declarations",
            "HuggingFaceTB-SmolLM3-3B": "does not render the tool declarations",
            "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "does not render the tool declarations",
            "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "does not render the tool declarations",
            "ibm-granite-granite-3.3-2B-Instruct": "does not render tool calls"}


@pytest.fixture(scope="module")
def toks():
    """Each shared tokenizer loaded once for the module (loading one takes seconds)."""
    from transformers import AutoTokenizer

    return {k: AutoTokenizer.from_pretrained(TOKENIZERS / k) for k in ("qwen2.5", "qwen3", "llama3.1")}


@pytest.fixture
def tok_of(toks):
    """tok_of(name): the module's tokenizer with its own chat template (restored after the test)."""
    before = {k: t.chat_template for k, t in toks.items()}
    yield toks.__getitem__
    for k, t in toks.items():
        t.chat_template = before[k]


@pytest.fixture(scope="module")
def results(toks):
    from fsdptrain.data.templatecheck import run_all

    return run_all(TEMPLATES, TOKENIZERS, toks)


@needs_fixtures
def test_every_template_trains_exactly_the_assistant_turns_or_refuses_in_one_line(results):
    assert len(results) == 70
    wrong = [f"{name} / {conv}: {o.cell()}" for name, (_, outcomes) in results.items()
             for conv, o in outcomes.items() if o.problems]
    assert not wrong, "\n".join(wrong)
    for _, outcomes in results.values():
        for o in outcomes.values():
            assert o.refused is None or ("\n" not in o.refused and o.refused.strip())
    cells = {Path(n).stem: {c: o.cell() for c, o in outcomes.items()} for n, (_, outcomes) in results.items()}
    for name in MUST_WORK:
        assert all(c.startswith("ok") for c in cells[name].values()), (name, cells[name])
    for name, why in NO_TOOLS.items():
        assert cells[name]["tools"].startswith("refused: " + why), (name, cells[name])
        assert all(c.startswith("ok") for k, c in cells[name].items() if k != "tools"), (name, cells[name])
    # templates that rewrite earlier turns train each turn against its own prompt: several examples, not refused
    assert cells["Qwen-Qwen3-0.6B"]["reasoning"] == "ok (2 examples)"
    assert cells["Qwen-Qwen2.5-7B-Instruct"]["system, 2 turns"] == "ok"  # prefix-stable: one example
    works = sum(all(c.startswith("ok") for c in row.values()) for row in cells.values())
    assert works >= 45


@needs_fixtures
def test_docs_table_is_the_checks_output(results):
    from fsdptrain.data.templatecheck import table

    doc = (REPO / "docs" / "templates.md").read_text()
    assert table(results) in doc, "regenerate with: python benchmarks/template_table.py --write"


@needs_fixtures
def test_reasoning_templates_keep_every_turns_reasoning_and_tokens_match_the_template(tok_of):
    """Qwen3 drops earlier <think> blocks: each turn is its own example whose tokens are the template's rendering
    of that turn's conversation, and whose targets are that turn's reply with its reasoning."""
    from fsdptrain.data.encode import IGNORE, conversation_examples
    from fsdptrain.data.templatecheck import CONVERSATIONS

    tok = tok_of("qwen3")
    messages, _ = CONVERSATIONS["reasoning"]
    made = conversation_examples(tok, messages, 4096)
    assert len(made) == 2
    for (ex, truncated), upto in zip(made, (2, 4)):
        assert not truncated
        assert ex.input_ids == tok(tok.apply_chat_template(messages[:upto], tokenize=False),
                                   add_special_tokens=False)["input_ids"]
        trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
        reply = messages[upto - 1]["content"].split("</think>")
        assert trained == "<think>\n" + reply[0].split("<think>\n")[1].strip() + "\n</think>\n\n" \
            + reply[1].strip() + "<|im_end|>\n"


@needs_fixtures
def test_llama31_own_template_refuses_tool_data_in_one_line_and_chatml_trains_the_calls(tmp_path, tok_of):
    """The Llama-3.1 tokenizer's own template has no tool support: the data set stops, naming the problem and
    the fix, instead of training `<|eot_id|>` for each call; with the suggested data.template the calls train."""
    from fsdptrain.data import cache
    from fsdptrain.data.encode import IGNORE
    from fsdptrain.data.sources import resolve
    from fsdptrain.data.tokenizer import apply_template

    tools = [{"name": "add", "description": "Add two numbers",
              "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]
    convo = [{"from": "human", "value": "What is 2 plus 3?"},
             {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
             {"from": "observation", "value": json.dumps({"result": 5})},
             {"from": "gpt", "value": "2 plus 3 is 5."}]
    (tmp_path / "tc.json").write_text(json.dumps([{"conversations": convo, "tools": json.dumps(tools)}] * 3))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"tc": {
        "file_name": "tc.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                      "tools": "tools"}}}))
    specs = resolve(["tc"], str(tmp_path))
    tok = tok_of("llama3.1")
    s = cache.Settings(max_length=2048, train_on_prompt=False, mask_history=False, max_samples=None, seed=1)
    with pytest.raises(UserError) as e:
        cache.prepare(specs, tok, s, tmp_path / "c", 0, 0, False, lambda m: None)
    assert str(e.value) == (
        f"{tmp_path / 'tc.json'} record 0: the tokenizer's chat template (data.template=auto): does not render the "
        "tool declarations (tool 'add' is missing from the prompt); set data.template=llama3 (fsdptrain's own, which "
        "renders tools, tool calls and reasoning) or use a tokenizer whose template does; see docs/templates.md")
    apply_template(tok, "llama3")
    s = cache.Settings(2048, False, False, None, 1, template="llama3")
    examples, st, _, _ = cache.prepare(specs, tok, s, tmp_path / "c", 0, 0, False, lambda m: None)
    assert st.kept == 3
    ex = examples[0]
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert trained == '{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>2 plus 3 is 5.<|eot_id|>'
    assert '"function": {"name": "add", "description": "Add two numbers"' in tok.decode(ex.input_ids)


def tool_data(tmp_path: Path) -> Path:
    """A sharegpt tool-call data set in LLaMA-Factory's layout (bare tool schemas, function_call turns)."""
    tools = [{"name": "add", "description": "Add two numbers",
              "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]
    convo = [{"from": "human", "value": "What is 2 plus 3?"},
             {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
             {"from": "observation", "value": json.dumps({"result": 5})},
             {"from": "gpt", "value": "2 plus 3 is 5."}]
    plain = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]
    broken = [{"from": "gpt", "value": "I speak first."}, {"from": "human", "value": "No."}]
    recs = [{"conversations": convo, "tools": json.dumps(tools)}, {"conversations": plain},
            {"conversations": broken}, {"conversations": convo, "tools": json.dumps(tools)}]
    (tmp_path / "tc.json").write_text(json.dumps(recs))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"tc": {
        "file_name": "tc.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                      "tools": "tools"}}}))
    return tmp_path


@needs_fixtures
def test_data_command_counts_marks_trained_spans_and_writes_jsonl(tmp_path, tok_of, monkeypatch):
    from click.testing import CliRunner

    from fsdptrain.cli import main
    from fsdptrain.data import preview
    from fsdptrain.data.encode import IGNORE, tokenize_record
    from fsdptrain.data.formats import convert
    from fsdptrain.data.sources import read, resolve

    def run_cli(args):  # in process, with the module's tokenizers (model.tokenizer names which)
        return CliRunner().invoke(main, args)

    monkeypatch.setattr(preview, "load_tokenizer", lambda path, *a: tok_of(Path(path).name))

    d = tool_data(tmp_path)
    common = ["data.datasets=[tc]", f"data.dataset_dir={d}", "data.max_length=64"]
    r = run_cli(["data", *common, f"model.tokenizer={TOKENIZERS / 'qwen2.5'}", "--show", "2", "--out",
                 str(tmp_path / "ex.jsonl")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == ("data: 'tc': read 4, skipped 1 (1 broken role order), kept 3 examples, truncated 2, split into "
                        "0 extra rows, dropped (no target token left) 0, target tokens "
                        + lines[0].rsplit(" ", 1)[1])
    rows = [json.loads(x) for x in (tmp_path / "ex.jsonl").read_text().splitlines()]
    assert [(x["source"], x["record"]) for x in rows] == [(str(d / "tc.json"), n) for n in (0, 1, 3)]
    tok = tok_of("qwen2.5")
    (spec,) = resolve(["tc"], str(d))
    conv = convert(spec, *read(spec))
    want = [tokenize_record(tok, rec, 64)[0][0] for rec in conv.records]
    assert [(x["input_ids"], x["labels"]) for x in rows] == [(e.input_ids, e.labels) for e in want]
    assert int(lines[0].rsplit(" ", 1)[1]) == sum(e.n_targets for e in want)
    # the printed examples: every [[...]] span is exactly a run of trained tokens, in order
    shown = r.stdout.split("--- example 1 ")[0]
    spans, ex = [], want[0]
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE and (not spans or spans[-1][1] is False):
            spans.append([[], True])
        elif lab == IGNORE and (not spans or spans[-1][1] is True):
            spans.append([[], False])
        spans[-1][0].append(t)
    marked = "".join(f"[[{tok.decode(ids)}]]" if t else tok.decode(ids) for ids, t in spans)
    assert marked in shown and shown.count("[[") == sum(t for _, t in spans) >= 1
    assert "[[Hi!<|im_end|>\n]]" in r.stdout
    # the Llama-3.1 tokenizer's own template would drop the tool declarations: exit 2, one line
    r = run_cli(["data", *common, f"model.tokenizer={TOKENIZERS / 'llama3.1'}"])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"fsdptrain: error: {d / 'tc.json'} record 0: the tokenizer's chat template "
                               "(data.template=auto): does not render the tool declarations")


@needs_fixtures
def test_separate_reasoning_content_is_rendered_by_the_template_or_inlined_never_dropped(tok_of):
    """OpenAI-style data keeps reasoning in `reasoning_content`: Qwen3's template renders it itself; Qwen2.5's
    knows only the content, so the reasoning goes in front of it as a <think> block instead of vanishing."""
    from fsdptrain.data.encode import IGNORE, conversation_examples
    from fsdptrain.data.formats import Spec, convert

    spec = Spec(name="r", files=["r.json"], formatting="openai")
    rec = {"messages": [{"role": "user", "content": "What is 6 times 7?"},
                        {"role": "assistant", "content": "It is 42.", "reasoning_content": "Six sevens."}]}
    (conv,) = convert(spec, [rec], ["r.json record 0"]).records
    assert conv["messages"][1]["reasoning_content"] == "Six sevens."
    for name, want in (("qwen3", "<think>\nSix sevens.\n</think>\n\nIt is 42.<|im_end|>\n"),
                       ("qwen2.5", "<think>\nSix sevens.\n</think>\n\nIt is 42.<|im_end|>\n")):
        tok = tok_of(name)
        ((ex, _),) = conversation_examples(tok, conv["messages"], 256)
        assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]) == want


def _pieces_encoded(tok, runs) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's way: each piece (a text, or a token id such as EOS) encoded on its own and concatenated;
    runs are (pieces, trained)."""
    from fsdptrain.data.encode import IGNORE

    ids, labels = [], []
    for pieces, trained in runs:
        run = [i for p in pieces for i in ([p] if isinstance(p, int) else tok.encode(p, add_special_tokens=False))]
        ids += run
        labels += run if trained else [IGNORE] * len(run)
    return ids, labels


@needs_fixtures
def test_lf_empty_and_default_templates_give_llamafactorys_tokens(tok_of):
    """data.template=empty concatenates the messages (no markers, nothing after a reply); default writes
    System:/Human:/Assistant: with the tokenizer's EOS; both as LLaMA-Factory encodes them, piece by piece."""
    from fsdptrain.data.encode import conversation_examples
    from fsdptrain.data.formats import link_tool_results, standard_tool
    from fsdptrain.data.templatecheck import CONVERSATIONS, check
    from fsdptrain.data.tokenizer import apply_template

    tok = tok_of("qwen2.5")
    eos = tok.eos_token_id
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six."}]
    want = {"empty": [(("Answer briefly.", "What is 2+2?"), False), (("Four.",), True), (("And 3+3?",), False),
                      (("Six.",), True)],
            "default": [(("System: Answer briefly.", eos, "\n", "Human: What is 2+2?", eos, "\nAssistant:"), False),
                        (("Four.", eos, "\n"), True), (("Human: And 3+3?", eos, "\nAssistant:"), False),
                        (("Six.", eos, "\n"), True)]}
    for name, runs in want.items():
        apply_template(tok, name)
        ((ex, truncated),) = conversation_examples(tok, msgs, 4096)
        assert (ex.input_ids, ex.labels) == _pieces_encoded(tok, runs), name
    # default renders tools, calls (LLaMA-Factory's Action / Action Input lines) and reasoning; only replies train
    apply_template(tok, "default")
    assert {c: check(tok, m, t).cell() for c, (m, t) in CONVERSATIONS.items()} == dict.fromkeys(CONVERSATIONS, "ok")
    messages, tools = CONVERSATIONS["tools"]
    ((ex, _),) = conversation_examples(tok, link_tool_results(messages), 4096, [standard_tool(t) for t in tools])
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])
    assert trained == ('Action: get_weather\nAction Input: {"city": "Lisbon", "unit": "celsius"}<|im_end|>\n'
                       "It is 23 degrees Celsius in Lisbon.<|im_end|>\n")
    # as in LLaMA-Factory, a record with a tool list, even an empty one, gets a system turn (so does llama3's)
    ((ex, _),) = conversation_examples(tok, msgs[1:3], 4096, [])
    assert tok.decode(ex.input_ids).startswith("System: <|im_end|>\nHuman: What is 2+2?")
    llama = tok_of("llama3.1")
    apply_template(llama, "llama3")
    ((ex, _),) = conversation_examples(llama, msgs[1:3], 4096, [])
    assert llama.decode(ex.input_ids).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                                 "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is")


@needs_fixtures
def test_qwen3_nothink_and_qwen_leave_out_qwen3s_empty_think_block(tok_of):
    """With Qwen3's (hybrid-thinking) tokenizer, LLaMA-Factory's qwen3_nothink writes a reply with no <think>
    block; so does fsdptrain's, and a multi-turn tool conversation is then one example, laid out as
    LLaMA-Factory's. Reasoning the data holds is still trained."""
    from fsdptrain.data.encode import IGNORE, conversation_examples
    from fsdptrain.data.formats import link_tool_results, standard_tool
    from fsdptrain.data.templatecheck import CONVERSATIONS
    from fsdptrain.data.tokenizer import apply_template

    tok = tok_of("qwen3")
    single = [{"role": "user", "content": "Give me a fruit."}, {"role": "assistant", "content": "Apple."}]
    assert "<think>\n\n</think>" in tok.apply_chat_template(single, tokenize=False)  # Qwen3's own writes one
    apply_template(tok, "qwen3_nothink")
    ((ex, _),) = conversation_examples(tok, single, 4096)
    assert (ex.input_ids, ex.labels) == _pieces_encoded(tok, [
        (("<|im_start|>user\nGive me a fruit.<|im_end|>\n<|im_start|>assistant\n",), False),
        (("Apple.<|im_end|>\n",), True)])
    # with tools (even none) and no system message LLaMA-Factory writes a system turn, the tools after its empty text
    messages, tools = CONVERSATIONS["tools"]
    ((ex, _),) = conversation_examples(tok, link_tool_results(messages), 4096, [standard_tool(t) for t in tools])
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\n\n\n# Tools\n")
    ((ex, _),) = conversation_examples(tok, single, 4096, [])
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    reasoned = [single[0], {"role": "assistant", "content": "<think>\nA common one.\n</think>\n\nApple."}]
    ((ex, _),) = conversation_examples(tok, reasoned, 4096)
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]) == \
        "<think>\nA common one.\n</think>\n\nApple.<|im_end|>\n"
