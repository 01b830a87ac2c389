"""SQuAD v1.1: loader, split by article, context windows around the answer, official EM / F1.

The loader reads the official JSON layout (``{"version": "1.1", "data": [{"title", "paragraphs":
[{"context", "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``) from a local
folder (``--data-dir`` or ``$DEFTUNE_SQUAD_DIR``) holding ``train-v1.1.json`` / ``dev-v1.1.json``,
or from the Hugging Face Hub (``rajpurkar/squad``) through the optional ``datasets`` package.

When only the dev file is available, :func:`split_by_article` makes a train and an eval part from
it *by article* (never by question: questions about one paragraph share their answers' context),
so results on it are not comparable to published SQuAD numbers.

Scoring follows the SQuAD v1.1 evaluation as described by Rajpurkar et al. (EMNLP 2016, §5):
answers are normalised (lower case; punctuation, the articles *a / an / the* and extra white
space removed), exact match is 1 when the normalised prediction equals a normalised gold answer,
F1 is the bag-of-tokens F1 between prediction and gold; each question takes the maximum over its
gold answers, and the dataset score is the mean, on a 0-100 scale. Reimplemented from that
description.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deftune.data.glue import DataError

SQUAD_DIR_ENV = "DEFTUNE_SQUAD_DIR"
_FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}


@dataclass(frozen=True)
class SquadExample:
    """One question. ``answers`` are the gold texts (duplicates kept), ``starts`` their offsets."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]

    @property
    def answer(self) -> str:
        """The first gold answer (the training target)."""
        return self.answers[0]


# ---- loading -----------------------------------------------------------------------------------


def resolve_squad_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The SQuAD folder (or file) from the argument, else ``$DEFTUNE_SQUAD_DIR``, else None (Hub)."""
    value = data_dir if data_dir is not None else os.environ.get(SQUAD_DIR_ENV)
    if value in (None, ""):
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(
            f"SQuAD data {str(path)!r} does not exist{' (from $' + SQUAD_DIR_ENV + ')' if data_dir is None else ''}; "
            f"give a folder holding {_FILES['dev']} (and optionally {_FILES['train']}): --data-dir of qa-train / "
            f"train --task squad, --squad-dir of compare, or {SQUAD_DIR_ENV}"
        )
    return path


def parse_squad(data: Mapping, where: str = "<json>") -> list[SquadExample]:
    """Examples from a parsed SQuAD JSON object; malformed entries raise :class:`DataError`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise DataError(f"{where}: not a SQuAD file (no top-level 'data' list)")
    out: list[SquadExample] = []
    seen: set[str] = set()
    for number, article in enumerate(data["data"]):
        title = article.get("title", "") if isinstance(article, Mapping) else ""
        try:
            for paragraph in article.get("paragraphs", []):
                context = paragraph["context"]
                for qa in paragraph.get("qas", []):
                    answers = qa.get("answers") or []
                    if not answers:
                        raise DataError(f"{where}: question {qa.get('id')!r} in {title!r} has no answers")
                    example = SquadExample(
                        id=str(qa["id"]),
                        title=title,
                        context=context,
                        question=qa["question"],
                        answers=tuple(a["text"] for a in answers),
                        starts=tuple(int(a["answer_start"]) for a in answers),
                    )
                    if example.id in seen:
                        raise DataError(f"{where}: question id {example.id!r} appears twice (ids must be unique: "
                                        "predictions are keyed by them)")
                    seen.add(example.id)
                    out.append(example)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{where}: article {number} ({title!r}) is malformed: "
                            f"{type(err).__name__}: {err} (SQuAD v1.1 layout expected)") from None
    if not out:
        raise DataError(f"{where} holds no questions")
    return out


def _load_from_hub(split: str) -> list[SquadExample]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no SQuAD folder was given and the optional 'datasets' package is missing: pass --data-dir "
            f"(or set {SQUAD_DIR_ENV}) or install deftune[hub]"
        ) from None
    ds = datasets.load_dataset("rajpurkar/squad", split="validation" if split == "dev" else split)
    return [
        SquadExample(
            id=row["id"], title=row["title"], context=row["context"], question=row["question"],
            answers=tuple(row["answers"]["text"]), starts=tuple(row["answers"]["answer_start"]),
        )
        for row in ds
    ]


def load_squad(split: str = "dev", data_dir: str | os.PathLike | None = None) -> list[SquadExample]:
    """All questions of one SQuAD v1.1 split (``train`` or ``dev``), in file order.

    ``data_dir`` may be the folder holding the official files or one JSON file.
    """
    if split not in _FILES:
        raise DataError(f"unknown SQuAD split {split!r}; choose one of {sorted(_FILES)}")
    root = resolve_squad_dir(data_dir)
    if root is None:
        return _load_from_hub(split)
    path = root if root.is_file() else root / _FILES[split]
    if not path.is_file():
        raise DataError(f"{str(path)!r} not found; the SQuAD folder must hold {_FILES[split]}")
    with path.open(encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err})") from None
    return parse_squad(data, str(path))


def split_by_article(
    examples: Sequence[SquadExample], eval_articles: int, seed: int = 0
) -> tuple[list[SquadExample], list[SquadExample]]:
    """``(train, eval)``: ``eval_articles`` whole articles (by title, seeded shuffle) go to eval."""
    titles = list(dict.fromkeys(e.title for e in examples))
    if not 0 < eval_articles < len(titles):
        raise DataError(f"eval_articles must be in 1..{len(titles) - 1} ({len(titles)} articles), got {eval_articles}")
    rng = random.Random(seed)
    held = set(rng.sample(titles, eval_articles))
    train = [e for e in examples if e.title not in held]
    evaluation = [e for e in examples if e.title in held]
    return train, evaluation


# ---- context windows ---------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences of ``text`` (a simple punctuation rule)."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [s for s in spans if s[1] > s[0]]


def window_context(
    example: SquadExample, budget: int, length: Callable[[str], int], seed: int = 0
) -> tuple[str, int]:
    """The context cut to at most ``budget`` length units around the first gold answer.

    Starts from the sentence holding the answer and adds whole neighbouring sentences, on a side
    drawn from a generator seeded by ``seed`` and the question id (so the answer is not always
    central), while the total stays within ``budget``. If the answer sentence alone is too long,
    words are dropped from its ends (the side farther from the answer first). Returns the
    window and the answer's new character offset. ``length`` measures a string (e.g. tokens).
    """
    context, start = example.context, example.starts[0]
    end = start + len(example.answer)
    if length(context) <= budget:
        return context, start
    spans = sentence_spans(context)
    i = next((k for k, (s, e) in enumerate(spans) if s <= start < e), 0)
    lo, hi = i, i
    # the answer may cross a sentence boundary: take every sentence it touches
    while hi + 1 < len(spans) and spans[hi][1] < end:
        hi += 1
    rng = random.Random(f"{seed}:{example.id}")
    while True:
        options = [k for k in (lo - 1, hi + 1) if 0 <= k < len(spans)]
        if not options:
            break
        k = rng.choice(options)
        a, b = (spans[k][0], spans[hi][1]) if k < lo else (spans[lo][0], spans[k][1])
        if length(context[a:b]) > budget:
            break
        lo, hi = min(lo, k), max(hi, k)
    a, b = spans[lo][0], spans[hi][1]
    if length(context[a:b]) > budget:
        a, b = _trim_words(context, a, b, start, end, budget, length)
    return context[a:b], start - a


def _trim_words(context: str, a: int, b: int, start: int, end: int, budget: int, length) -> tuple[int, int]:
    """Shrink ``[a, b)`` word by word (never cutting ``[start, end)``) until it fits ``budget``."""
    while length(context[a:b]) > budget:
        left_room, right_room = start - a, b - end
        if left_room <= 0 and right_room <= 0:
            break  # only the answer is left
        if left_room >= right_room:
            nxt = context.find(" ", a + 1, start)
            a = start if nxt < 0 else nxt + 1
        else:
            prv = context.rfind(" ", end, b - 1)
            b = end if prv < 0 else prv
    return a, b


# ---- official-style scoring --------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 between the normalised prediction and gold (bags of tokens)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return max(metric(prediction, g) for g in golds)


def squad_scores(predictions: Mapping[str, str], examples: Sequence[SquadExample]) -> dict[str, float]:
    """``{"exact_match", "f1", "count"}`` (0-100) of ``predictions`` (id -> text) on ``examples``.

    A question without a prediction scores 0, as in the official evaluation.
    """
    if not examples:
        raise ValueError("cannot score zero questions")
    em = f1 = 0.0
    for ex in examples:
        pred = predictions.get(ex.id)
        if pred is None:
            continue
        em += best_over_golds(exact_match, pred, ex.answers)
        f1 += best_over_golds(f1_score, pred, ex.answers)
    n = len(examples)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": float(n)}
