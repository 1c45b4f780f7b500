"""Self-distilled chat data: prompts are distinct and disjoint from the benchmark's, and an
interrupted write resumes to the same file as an uninterrupted one."""

import json

import pytest

import eefast.data.chat as chat
from eefast.data import PROMPTS


class TemplateTokenizer:
    def apply_chat_template(self, convo, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in convo)


def fake_replies(model, tokenizer, prompts, max_new_tokens):
    return [p.upper()[:max_new_tokens] for p in prompts]


def test_prompts_are_distinct_seeded_and_not_the_benchmarks():
    prompts = chat.chat_prompts(300)
    assert len(set(prompts)) == 300 and chat.chat_prompts(300) == prompts
    assert not set(prompts) & set(PROMPTS)
    with pytest.raises(ValueError, match="n must be in"):
        chat.chat_prompts(0)


def test_interrupted_write_resumes_to_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "greedy_replies", fake_replies)
    whole = tmp_path / "whole.jsonl"
    chat.write_self_distilled(None, TemplateTokenizer(), whole, 7, 40, batch_size=3)

    calls = []

    def dies_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_replies(*args)

    monkeypatch.setattr(chat, "greedy_replies", dies_on_second_batch)
    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        chat.write_self_distilled(None, TemplateTokenizer(), part, 7, 40, batch_size=3)
    with part.open("a") as f:
        f.write('{"prompt": "torn')  # a crash mid-line
    monkeypatch.setattr(chat, "greedy_replies", fake_replies)
    rows = chat.write_self_distilled(None, TemplateTokenizer(), part, 7, 40, batch_size=3)
    assert rows == 7 and part.read_text() == whole.read_text()
    first = json.loads(whole.read_text().splitlines()[0])
    assert first["text"].startswith(f"<user>{first['prompt']}</user><assistant>")


def test_resume_refuses_a_file_written_for_other_prompts(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "greedy_replies", fake_replies)
    path = tmp_path / "chat.jsonl"
    chat.write_self_distilled(None, TemplateTokenizer(), path, 4, 40, batch_size=2)
    rows = path.read_text().splitlines()
    other = json.loads(rows[1]) | {"prompt": "a prompt from another prompt list"}
    path.write_text("\n".join([rows[0], json.dumps(other), *rows[2:]]) + "\n")
    with pytest.raises(ValueError, match="row 1 answers"):
        chat.write_self_distilled(None, TemplateTokenizer(), path, 6, 40, batch_size=2)


def test_prompts_cover_code_and_how_to_requests():
    prompts = chat.chat_prompts(400)
    assert any("Python" in p or "JavaScript" in p for p in prompts)
    assert any(p.startswith("How do I make") for p in prompts)


@pytest.mark.parametrize(
    "content", ["my notes\nline two\n", "my notes\nno newline", "x", '{"a": 1}\n']
)
def test_resume_never_touches_a_file_it_did_not_write(tmp_path, monkeypatch, content):
    monkeypatch.setattr(chat, "greedy_replies", fake_replies)
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="was not changed"):
        chat.write_self_distilled(None, TemplateTokenizer(), path, 4, 40, batch_size=2)
    assert path.read_text() == content


def test_user_prompt_files(tmp_path):
    from eefast.data.prompts import load_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\n  Second prompt  \n")
    assert load_prompts(txt) == ["First prompt", "Second prompt"]
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "A"}\n{"instruction": "B", "input": "C"}\n{"instruction": "D"}\n')
    assert load_prompts(rows) == ["A", "B\n\nC", "D"]
    rows.write_text('{"prompt": "A"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected a 'prompt'"):
        load_prompts(rows)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.txt")
