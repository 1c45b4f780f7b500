"""The exit classifier: it learns its labels, round-trips through files, drives threshold mode
and lets a "not yet" skip the exit's LM head."""

import pytest
import torch

import eefast.generation.runner as runner
from eefast.exits import add_exits, load_exits, save_classifier, save_exits
from eefast.generation import generate
from eefast.nn.exit_classifier import ExitClassifier
from eefast.train.exit_classifier import exit_examples, fit_exit_classifier
from tiny_models import tiny_model, token_batch

NEW = 12


@pytest.fixture()
def ee():
    return add_exits(tiny_model("llama"), [1, 2], kind="norm")


def constant_classifier(ee, logit: float) -> ExitClassifier:
    clf = ExitClassifier(ee.exit_layers, ee.parts.final_norm.weight.shape[0])
    with torch.no_grad():
        for probe in clf.probes.values():
            probe.weight.zero_()
            probe.bias.fill_(logit)
    return clf


def bce(clf, examples) -> float:
    with torch.no_grad():
        return sum(
            float(torch.nn.functional.binary_cross_entropy_with_logits(clf.logit(la, x), y.float()))
            for la, (x, _, y) in examples.items()
        )


def test_fit_lowers_the_loss_and_reports_both_measures(ee):
    blocks = token_batch(8, 32, seed=1)
    examples = exit_examples(ee, blocks, progress=False)
    for x, max_prob, y in examples.values():
        assert x.shape == (8 * 32, 64) and max_prob.shape == y.shape == (8 * 32,)
    before = bce(constant_classifier(ee, 0.0), examples)
    clf, rows = fit_exit_classifier(
        ee, blocks, token_batch(2, 32, seed=2), steps=200, progress=False
    )
    assert bce(clf, examples) < 0.9 * before
    assert ee.classifier is clf and [r["layer"] for r in rows] == [1, 2]
    assert {"clf>=0.9 precision", "max_prob>=0.9 coverage"} <= set(rows[0])


def test_files_round_trip_and_new_exits_drop_a_stale_classifier(ee, tmp_path):
    save_exits(ee, tmp_path)
    ee.classifier = constant_classifier(ee, 0.3)
    save_classifier(ee, tmp_path)
    again = load_exits(tiny_model("llama"), tmp_path)
    h = torch.randn(5, 64)
    torch.testing.assert_close(again.classifier(2, h), ee.classifier(2, h))
    save_exits(ee, tmp_path)
    assert load_exits(tiny_model("llama"), tmp_path).classifier is None


def test_threshold_mode_follows_the_classifier(ee):
    prompts = token_batch(2, 7, seed=4).tolist()
    ee.classifier = constant_classifier(ee, 20.0)  # always confident: leave at the first exit
    got = generate(ee, None, prompts, "threshold", NEW, measure="classifier", threshold=0.5)
    first = generate(ee, None, prompts, "threshold", NEW, measure="max_prob", threshold=0.0)
    assert got.tokens == first.tokens
    assert set(got.stats.exit_layers) == {1, 4}  # the prefill's token is full depth


def test_not_yet_skips_the_exit_head(ee, monkeypatch):
    prompts = token_batch(2, 7, seed=4).tolist()
    full = generate(ee, None, prompts, "full", NEW)
    calls = []
    monkeypatch.setattr(runner, "exit_stats", lambda *a: calls.append(1))
    ee.classifier = constant_classifier(ee, -20.0)  # never confident
    got = generate(ee, None, prompts, "threshold", NEW, measure="classifier", threshold=0.5)
    assert got.tokens == full.tokens and not calls
    assert got.stats.head_calls == full.stats.head_calls  # the final head only


def test_classifier_measure_needs_a_classifier(ee):
    with pytest.raises(ValueError, match="needs a fitted exit classifier"):
        generate(ee, None, [[5, 6]], "threshold", NEW, measure="classifier")
