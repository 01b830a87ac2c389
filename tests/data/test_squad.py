"""SQuAD v1.1 loading, article split, context windows and official-style EM / F1 (hand-made cases)."""

from __future__ import annotations

import json

import pytest

from deftune.data.glue import DataError
from deftune.data.squad import (
    SquadExample,
    exact_match,
    f1_score,
    load_squad,
    normalize_answer,
    parse_squad,
    sentence_spans,
    split_by_article,
    squad_scores,
    window_context,
)


def squad_json(n_articles: int = 3) -> dict:
    data = []
    for a in range(n_articles):
        context = f"Article {a} starts here. The answer is Paris {a}. It ends here."
        qas = [
            {"id": f"q{a}-{k}", "question": f"What is the answer {k}?",
             "answers": [{"text": f"Paris {a}", "answer_start": context.index("Paris")}]}
            for k in range(2)
        ]
        data.append({"title": f"T{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


# ---- normalisation and scores (hand-computed) ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  a   cat  ", "cat"),
        ("An apple, the pie.", "apple pie"),
        ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_articles():
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


def test_f1_hand_computed():
    # pred {broncos}, gold {denver, broncos}: P = 1, R = 1/2, F1 = 2/3
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred {a1, a1}, gold {a1}: P = 1/2, R = 1, F1 = 2/3
    assert f1_score("paris paris", "Paris") == pytest.approx(2 / 3)
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to empty: no common token


def test_squad_scores_max_over_golds_and_missing_prediction():
    ex = [
        SquadExample("1", "t", "c", "q", ("Denver Broncos", "Broncos"), (0, 7)),
        SquadExample("2", "t", "c", "q", ("1966",), (0,)),
        SquadExample("3", "t", "c", "q", ("Paris",), (0,)),
    ]
    preds = {"1": "Broncos", "2": "in 1966"}  # 3 missing -> 0
    s = squad_scores(preds, ex)
    # EM: 1 (second gold) + 0 + 0 = 1/3; F1: 1 + 2/3 (P=1/2, R=1) + 0 -> 5/9
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * 5 / 9)
    assert s["count"] == 3


# ---- loading and splitting -----------------------------------------------------------------------


def test_load_squad_from_folder_and_file(tmp_path):
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(squad_json()), encoding="utf-8")
    from_folder = load_squad("dev", tmp_path)
    from_file = load_squad("dev", tmp_path / "dev-v1.1.json")
    assert from_folder == from_file
    assert len(from_folder) == 6
    ex = from_folder[0]
    assert ex.context[ex.starts[0] :].startswith(ex.answer)


def test_load_squad_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_squad("dev", tmp_path / "missing")
    with pytest.raises(DataError, match="train-v1.1.json"):
        load_squad("train", tmp_path)
    with pytest.raises(DataError, match="unknown SQuAD split"):
        load_squad("test", tmp_path)
    with pytest.raises(DataError, match="no top-level 'data'"):
        parse_squad({"version": "1.1"})


def test_split_by_article_never_splits_an_article():
    examples = parse_squad(squad_json(5))
    train, held = split_by_article(examples, eval_articles=2, seed=3)
    assert {e.title for e in train}.isdisjoint({e.title for e in held})
    assert len({e.title for e in held}) == 2
    assert len(train) + len(held) == len(examples)
    assert split_by_article(examples, 2, seed=3) == (train, held)  # deterministic
    with pytest.raises(DataError, match="eval_articles"):
        split_by_article(examples, 5)


# ---- context windows -------------------------------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


def test_sentence_spans():
    text = "One two. Three four! Five?"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["One two.", "Three four!", "Five?"]


def test_window_keeps_answer_and_fits_budget():
    sentences = [f"Sentence number {i} is here." for i in range(20)]
    sentences[11] = "The capital of France is Paris today."
    context = " ".join(sentences)
    ex = SquadExample("x", "t", context, "q", ("Paris",), (context.index("Paris"),))
    window, start = window_context(ex, budget=16, length=words)
    assert words(window) <= 16
    assert window[start : start + 5] == "Paris"
    assert "The capital of France" in window  # whole answer sentence kept
    short = SquadExample("y", "t", "Paris is big.", "q", ("Paris",), (0,))
    assert window_context(short, 16, words) == ("Paris is big.", 0)


def test_window_trims_a_long_answer_sentence_by_words():
    context = " ".join(f"w{i}" for i in range(50)) + " ANSWER " + " ".join(f"v{i}" for i in range(50)) + "."
    ex = SquadExample("z", "t", context, "q", ("ANSWER",), (context.index("ANSWER"),))
    window, start = window_context(ex, budget=9, length=words)
    assert words(window) <= 9
    assert window[start : start + 6] == "ANSWER"


def test_f1_counts_repeated_tokens_on_both_sides():
    assert f1_score("paris paris", "Paris Paris") == 1.0  # bags: 2 common tokens, not 1 common type
    assert f1_score("paris paris london", "paris paris") == pytest.approx(0.8)


def test_trimming_a_tie_drops_a_word_on_the_left_first():
    """Equal room on both sides of the answer: the left side loses a word first (then they alternate
    by room), so the window of an odd budget leans right."""
    from deftune.data.squad import _trim_words

    context = "l3 l2 l1 ANSWER r1 r2 r3"
    start = context.index("ANSWER")
    a, b = _trim_words(context, 0, len(context), start, start + 6, budget=6, length=words)
    assert context[a:b] == "l2 l1 ANSWER r1 r2 r3"
    a, b = _trim_words(context, 0, len(context), start, start + 6, budget=4, length=words)
    assert context[a:b] == "l1 ANSWER r1 r2"


def test_window_sides_are_drawn_per_question():
    """The random choice of which neighbouring sentence to add is seeded by (seed, question id): two
    questions on one context get their own windows, and each is reproducible."""
    sentences = [f"Sentence {i} is a filler." for i in range(30)]
    sentences[15] = "The answer is Paris here."
    context = " ".join(sentences)
    start = context.index("Paris")
    windows = {window_context(SquadExample(f"q{k}", "t", context, "q", ("Paris",), (start,)), 20, words, seed=0)[0]
               for k in range(8)}
    assert len(windows) > 1
    ex = SquadExample("q0", "t", context, "q", ("Paris",), (start,))
    assert window_context(ex, 20, words, seed=0) == window_context(ex, 20, words, seed=0)


@pytest.mark.parametrize("broken, says", [
    ({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": [
        {"text": "c", "answer_start": 0}]}]}]}]}, "KeyError: 'question'"),
    ({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}, "KeyError: 'context'"),
    ({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": [
        {"text": "c", "answer_start": "x"}]}]}]}]}, "ValueError"),
    ({"data": "not a list"}, "no top-level 'data' list"),
    ({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "c", "answer_start": 0}]},
        {"id": "1", "question": "r", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}, "appears twice"),
])
def test_malformed_squad_entries_are_data_errors_naming_the_article(broken, says):
    with pytest.raises(DataError, match=says):
        parse_squad(broken, "bad.json")
