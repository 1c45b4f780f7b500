"""A user error on the command line is one line on stderr, naming the argument or file, with
exit status 2 and no traceback; --debug shows the traceback."""

import json
import subprocess
import sys

import pytest

from eefast.cli import main

BAD_ARGUMENTS = [
    (["tune", "--out", "x", "--save-every", "0"], "--save-every"),
    (["tune", "--out", "x", "--eval-every", "0"], "--eval-every"),
    (["tune", "--out", "x", "--batch-size", "0"], "--batch-size"),
    (["tune", "--out", "x", "--lr", "nan"], "--lr"),
    (["tune", "--out", "x", "--kd-weight", "-1"], "--kd-weight"),
    (["tune", "--out", "x", "--exits", "a,b"], "--exits"),
    (["demo", "--steps", "-3"], "--steps"),
    (["train-classifier", "--exits", "x", "--blocks", "0"], "--blocks"),
    (["draft-vocab", "--exits", "x", "--size", "0"], "--size"),
    (["distill-data", "--out", "x.jsonl", "--prompts", "0"], "--prompts"),
    (["eval-exits", "--exits", "x", "--batch-size", "-2"], "--batch-size"),
    (["generate", "--exits", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "--exits", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "--exits", "x", "--draft-k", "0"], "--draft-k"),
    (["calibrate", "--exits", "x", "--thresholds", "0.5,inf"], "--thresholds"),
    (["bench-generate", "--exits", "x", "--batch-sizes", "x"], "--batch-sizes"),
    (["finetune", "--out", "x", "--alpha", "nan"], "--alpha"),
    (["finetune", "--out", "x", "--scaling", "nan"], "--scaling"),
    (["finetune", "--out", "x", "--max-len", "0"], "--max-len"),
    (["finetune", "--out", "x", "--lora-dropout", "2"], "--lora-dropout"),
    (["eval", "--limit", "-1"], "--limit"),
    (["demo-ops", "--reps", "0"], "--reps"),
]


@pytest.mark.parametrize(("argv", "name"), BAD_ARGUMENTS, ids=lambda a: " ".join(a))
def test_a_bad_argument_is_one_line_naming_it(argv, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and name in err, err


def _run(*argv, cwd):
    return subprocess.run(
        [sys.executable, "-m", "eefast", *argv], capture_output=True, text=True, cwd=cwd
    )


def test_a_bad_file_is_one_line_naming_it_and_debug_shows_the_traceback(tmp_path):
    exits = tmp_path / "exits"
    exits.mkdir()
    (exits / "exits.json").write_text("{not json")
    model = tmp_path / "no-such-model"
    out = _run("generate", "--model", str(model), "--exits", str(exits), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("eefast generate: error:")
    assert str(model) in out.stderr
    debug = _run(
        "--debug", "eval-exits", "--model", str(model), "--exits", str(exits), cwd=tmp_path
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_finetune_data_errors_name_the_file(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    out = _run("finetune", "--out", str(tmp_path / "o"), "--data", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"{bad}:2" in out.stderr
    assert json.loads(bad.read_text().splitlines()[0])  # untouched


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe not utf-8\n", "not UTF-8 text"),
        (b'{"text": "ok"}\n{oops\n', ":2: not JSON"),
        (b'{"text": 3}\n', "field 'text' must be a string"),
        (b'["a list"]\n', ":1: expected a JSON object"),
    ],
)
def test_corpus_and_row_errors_name_the_file_and_line(tmp_path, content, message):
    from eefast.data import load_documents, load_rows

    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    for load in (load_documents, lambda p: load_rows(p, "train")):
        with pytest.raises(ValueError, match=message) as e:
            load(str(path))
        assert str(path) in str(e.value)


def test_answer_accuracy_refuses_text_rows():
    from eefast.eval import answer_accuracy

    with pytest.raises(ValueError, match="row 0 has no 'instruction'"):
        answer_accuracy(None, None, [{"text": "just prose"}])


def _first_case_per_command():
    seen = {}
    for argv, name in BAD_ARGUMENTS:
        seen.setdefault(argv[0], (argv, name))
    return list(seen.values())


@pytest.mark.parametrize(("argv", "name"), _first_case_per_command(), ids=lambda a: str(a[0]))
def test_every_command_in_a_fresh_process(argv, name, tmp_path):
    out = _run(*argv, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and name in out.stderr
