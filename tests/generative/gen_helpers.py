"""Helpers shared by the generative tests (a hand-made SQuAD file, prompt encoding)."""

from __future__ import annotations

from deftune.generative.format import encode_example

FACTS = [
    ("Paris", "Paris is the capital of France. It lies on the Seine. Many people live there."),
    ("1966", "The game was played in 1966 in Denver. The Broncos won it. The fans were happy."),
    ("Denver Broncos", "The Denver Broncos won the game. They scored late. The quick fox watched."),
]


def make_squad(n_articles: int = 4) -> dict:
    data = []
    for a in range(n_articles):
        paragraphs = []
        for f, (answer, context) in enumerate(FACTS):
            qas = [{"id": f"a{a}-f{f}-q{k}", "question": f"What is it {k}?",
                    "answers": [{"text": answer, "answer_start": context.index(answer)}]} for k in range(2)]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Article {a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def encode_all(examples, tokenizer, seq2seq: bool, max_length: int = 128):
    return [encode_example(e, tokenizer, style="plain", seq2seq=seq2seq, max_length=max_length,
                           max_context_tokens=max_length // 2) for e in examples]
