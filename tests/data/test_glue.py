"""GLUE loaders: the real files when present, and clear errors for bad input."""

from __future__ import annotations

import pytest

from deftune.data.glue import DataError, Example, get_task, load_glue, make_batches, read_glue_tsv, subsample
from deftune.data.metrics import compute_metrics


def test_real_tasks_load(data_dir):
    expected = {"sst2": 872, "cola": 1043, "mrpc": 408, "rte": 277, "stsb": 1500, "qnli": 1000}
    for name, n in expected.items():
        dev = load_glue(name, "dev", data_dir)
        assert len(dev) == n
        task = get_task(name)
        if task.is_regression:
            assert all(0.0 <= e.label <= 5.0 for e in dev)
        else:
            assert {e.label for e in dev} == set(range(task.num_labels))
        assert (dev[0].text_b is None) == (len(task.text_cols) == 1)
    # MRPC starts with a BOM: the header must still be found
    assert load_glue("mrpc", "train", data_dir)[0].text_b


def test_env_variable_is_used(data_dir, monkeypatch):
    monkeypatch.setenv("DEFTUNE_DATA_DIR", data_dir)
    assert len(load_glue("rte", "dev")) == 277


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist.*--data-dir"):
        load_glue("sst2", "dev", tmp_path / "nope")
    with pytest.raises(DataError, match="task folder .*SST-2"):
        load_glue("sst2", "dev", tmp_path)
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(DataError, match="dev.tsv.*not found"):
        load_glue("sst2", "dev", tmp_path)


@pytest.mark.parametrize("task, folder, header", [
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n"),
    ("qnli", "QNLI", "index\tquestion\tsentence\tlabel\n"),
])
def test_entailment_tasks_use_the_hubs_class_ids(tmp_path, task, folder, header):
    """glue/rte and glue/qnli: entailment 0, not_entailment 1 (a swap would flip every prediction
    between a local folder and the Hub)."""
    (tmp_path / folder).mkdir()
    rows = "".join(f"{i}\ta{i}\tb{i}\t{label}\n" for i, label in enumerate(["entailment", "not_entailment"]))
    (tmp_path / folder / "dev.tsv").write_text(header + rows)
    examples = load_glue(task, "dev", tmp_path)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("a0", "b0", 0), ("a1", "b1", 1)]


def test_cola_reads_the_headerless_file_of_glue(tmp_path):
    """CoLA ships without a header: source, label, original mark, sentence."""
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tThe book is good .\ngj04\t0\t*\tBook good the is .\n")
    examples = load_glue("cola", "dev", tmp_path)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("The book is good .", None, 1),
                                                               ("Book good the is .", None, 0)]


def test_mnli_dev_is_the_matched_file_with_the_hubs_class_ids(tmp_path):
    """GLUE ships MNLI's dev as dev_matched.tsv; class ids follow the Hub's glue/mnli ClassLabel
    (entailment 0, neutral 1, contradiction 2) so a local folder and the Hub train the same head."""
    folder = tmp_path / "MNLI"
    folder.mkdir()
    header = "index\tsentence1\tsentence2\tgold_label\n"
    rows = "".join(f"{i}\tp{i}\th{i}\t{label}\n" for i, label in enumerate(["entailment", "neutral", "contradiction"]))
    (folder / "dev_matched.tsv").write_text(header + rows)
    assert [e.label for e in load_glue("mnli", "dev", tmp_path)] == [0, 1, 2]
    assert get_task("mnli").hub_dev == "validation_matched"
    (folder / "dev_matched.tsv").unlink()
    with pytest.raises(DataError, match="must hold train.tsv and dev_matched.tsv"):
        load_glue("mnli", "dev", tmp_path)


def test_malformed_row_names_file_and_line(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad row without label\n")
    with pytest.raises(DataError, match=r"dev.tsv:3: expected 2 tab-separated fields, got 1"):
        load_glue("sst2", "dev", tmp_path)
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood\t7\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: label '7' is not one of"):
        load_glue("sst2", "dev", tmp_path)


def test_empty_dataset(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty dataset"):
        read_glue_tsv(get_task("sst2"), folder / "dev.tsv")
    with pytest.raises(DataError, match="empty dataset"):
        make_batches([], tokenizer=None, batch_size=2)


def test_unknown_task_and_split():
    with pytest.raises(DataError, match="unknown GLUE task 'sst3'.*sst2"):
        get_task("sst3")
    with pytest.raises(DataError, match="unknown split"):
        load_glue("sst2", "validate", "/")


def test_subsample_is_fixed():
    items = list(range(100))
    draw = subsample(items, 10, seed=3)
    assert draw == subsample(items, 10, seed=3)  # the same seed: the same subset
    assert len(set(draw)) == 10 and set(draw) <= set(items) and draw != items[:10]  # a random draw, not a prefix
    assert draw != subsample(items, 10, seed=4)  # the seed matters
    assert subsample(items, None) == items and subsample(items, 200) == items


def test_metrics_hand_values():
    m = compute_metrics(["accuracy", "f1", "matthews"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["f1"] == pytest.approx(100 * 2 * 2 / (2 * 2 + 1 + 0))  # tp=2, fp=1, fn=0
    assert m["matthews"] == pytest.approx(100 * (2 * 1 - 1 * 0) / ((3 * 2 * 1 * 2) ** 0.5))
    r = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0], [2.0, 4.0, 7.0])
    assert r["spearman"] == pytest.approx(100.0)
    assert 95 < r["pearson"] < 100
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], [1], [1])


def test_holdout_split_is_fixed_disjoint_and_complete(tmp_path):
    from deftune.data.glue import load_split, split_holdout

    examples = [Example(text_a=f"s{i}", text_b=None, label=i % 2) for i in range(50)]
    rest, held = split_holdout(examples, 10)
    assert len(held) == 10 and len(rest) == 40
    assert {e.text_a for e in rest} | {e.text_a for e in held} == {e.text_a for e in examples}
    assert not {e.text_a for e in rest} & {e.text_a for e in held}
    assert split_holdout(examples, 10) == (rest, held)  # the same draw for every run
    assert [e.text_a for e in held] == sorted((e.text_a for e in held), key=lambda t: int(t[1:]))  # order kept
    for bad in (0, 50, 2.5):
        with pytest.raises(DataError, match="holdout must be an integer in \\[1, 49\\]"):
            split_holdout(examples, bad)
    with pytest.raises(DataError, match="was not trained with --holdout N"):
        load_split("sst2", "holdout", tmp_path)


def test_correlations_keep_their_sign_and_rank_metric():
    down = compute_metrics(["pearson", "spearman"], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0])
    assert down == {"pearson": pytest.approx(-100.0), "spearman": pytest.approx(-100.0)}
    # one swapped pair of four: Spearman 80 (Kendall's tau would read 66.7)
    assert compute_metrics(["spearman"], [1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0])["spearman"] == pytest.approx(80.0)
    # a constant prediction has no correlation: 0, not NaN
    flat = compute_metrics(["pearson", "spearman"], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert flat == {"pearson": 0.0, "spearman": 0.0}


def _word_tokenizer():
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(300))]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


def test_batches_of_scores_pairs_and_long_texts():
    """Regression labels stay floats; a pair's second sentence is encoded (segment 1); ``max_length``
    truncates."""
    tok = _word_tokenizer()
    stsb = [Example("w1 w2", "w3 w4 w5", 2.6), Example("w6", "w7", 0.4)]
    (b,) = make_batches(stsb, tok, batch_size=2, regression=True)
    assert b["labels"].dtype.is_floating_point and b["labels"].tolist() == pytest.approx([2.6, 0.4])
    assert (b["token_type_ids"][0] == 1).sum() == 3 + 1  # w3 w4 w5 [SEP]
    long = [Example(" ".join(f"w{i}" for i in range(200)), None, 1)]
    (b,) = make_batches(long, tok, batch_size=1, max_length=8)
    assert b["input_ids"].shape == (1, 8)


def test_stsb_scores_parse_as_written(tmp_path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    rows = ["index\tg\tf\ty\ts\tl\tsentence1\tsentence2\tscore", "0\tx\tx\tx\tx\tx\ta b\tc d\t2.6"]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    assert [e.label for e in load_glue("stsb", "train", tmp_path)] == [2.6]


def test_make_batches_shuffles_by_its_seed():
    tok = _word_tokenizer()
    examples = [Example(f"w{i}", None, i % 2) for i in range(12)]
    first = [b["input_ids"][:, 1].tolist() for b in make_batches(examples, tok, batch_size=4, shuffle=True, seed=0)]
    again = [b["input_ids"][:, 1].tolist() for b in make_batches(examples, tok, batch_size=4, shuffle=True, seed=0)]
    other = [b["input_ids"][:, 1].tolist() for b in make_batches(examples, tok, batch_size=4, shuffle=True, seed=1)]
    assert first == again and first != other


def test_held_out_examples_are_a_draw_and_never_train(tmp_path):
    from deftune.data.glue import load_split

    folder = tmp_path / "SST-2"
    folder.mkdir()
    rows = ["sentence\tlabel"] + [f"s{i}\t{i % 2}" for i in range(50)]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    train = {e.text_a for e in load_split("sst2", "train", tmp_path, holdout=10)}
    held = {e.text_a for e in load_split("sst2", "holdout", tmp_path, holdout=10)}
    assert len(train) == 40 and len(held) == 10 and not train & held
    assert held != {f"s{i}" for i in range(10)}  # a seeded draw, not the first rows


def test_a_stray_tab_or_a_non_finite_score_is_refused_by_line(tmp_path):
    """A tab inside a sentence would shift the fields after it: MRPC's second sentence would be
    the tail of the first. A NaN score would turn the loss and Pearson into NaN."""
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (mrpc / "dev.tsv").write_text(head + "1\t1\t2\tThe cat\tsat here.\tA cat sat here.\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: expected 5 tab-separated fields, got 6"):
        load_glue("mrpc", "dev", tmp_path)
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for bad in ("nan", "inf"):
        (stsb / "dev.tsv").write_text(head + f"0\tg\tf\t2012\t0\ts\ts\tA\tB\t{bad}\n")
        with pytest.raises(DataError, match=rf"dev.tsv:2: score '{bad}' is not a finite number"):
            load_glue("stsb", "dev", tmp_path)
