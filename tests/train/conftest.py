"""A tiny GLUE folder and a tiny BERT checkpoint on disk, for end-to-end runs."""

from __future__ import annotations

import pytest
import torch


def _tiny_glue_and_model(root):
    """A tiny SST-2 folder, a tiny BERT checkpoint and its word-level tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = "good bad great awful fine movie plot acting dull fun".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    glue = root / "glue" / "SST-2"
    glue.mkdir(parents=True)
    rows = ["sentence\tlabel"] + [
        f"{' '.join(words[(i + j) % len(words)] for j in range(1 + i % 6))}\t{i % 2}" for i in range(40)
    ]
    (glue / "train.tsv").write_text("\n".join(rows) + "\n")
    (glue / "dev.tsv").write_text("\n".join(rows[:17]) + "\n")
    return model_dir, root / "glue"


@pytest.fixture
def tiny_setup(tmp_path):
    return _tiny_glue_and_model(tmp_path)
