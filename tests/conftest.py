"""Shared fixtures: tiny random models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DEFTUNE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_bert(num_labels: int = 2, hidden_act: str = "gelu"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels, hidden_act=hidden_act,
    )
    return BertForSequenceClassification(cfg).eval()


def randomise_affine(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every linear bias and norm weight / bias random values (in place; returns ``model``).

    transformers initialises biases to 0 and norms to the identity, so a test on a fresh tiny model
    cannot see a bias or a norm that folding or skipping forgets; after this it can."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if is_norm and isinstance(weight, torch.Tensor):
                weight.copy_(1.0 + 0.2 * torch.randn(weight.shape, generator=g))
            if (is_norm or isinstance(module, torch.nn.Linear)) and isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
    return model


@pytest.fixture
def bert():
    return tiny_bert()


def batch(vocab: int = 100, b: int = 3, t: int = 7, pad_last: int = 2, seed: int = 0) -> dict:
    """A batch whose last example has ``pad_last`` padding positions at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad_last:
        mask[-1, t - pad_last :] = 0
        ids[-1, t - pad_last :] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def data_dir():
    """The shared GLUE folder, or skip."""
    here = os.path.dirname(__file__)
    path = os.environ.get("DEFTUNE_DATA_DIR") or os.path.join(here, "..", "..", "shared", "data", "glue")
    if not os.path.isdir(path):
        pytest.skip("GLUE data folder not available (set DEFTUNE_DATA_DIR)")
    return path


def _tiny_glue_and_model(root):
    """A tiny SST-2 folder, a tiny BERT checkpoint and its word-level tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = "good bad great awful fine movie plot acting dull fun".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    model_dir = root / "model"
    model_dir.mkdir()
    # vocab= (a dict), not vocab_file=: transformers 5 ignores the file there and keeps 5 tokens
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
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


def tiny_train_config(tiny_setup, tmp_path, **kw):
    """A 4-step TrainConfig on the ``tiny_setup`` model and data, saving into ``tmp_path / "run"``."""
    from deftune.train import TrainConfig

    model_dir, data_dir = tiny_setup
    base = dict(task="sst2", model=str(model_dir), data_dir=str(data_dir), steps=4, batch_size=4,
                log_every=1, lr_warmup_steps=0, output_dir=str(tmp_path / "run"), eval_batch_size=8)
    base.update(kw)
    return TrainConfig(**base)
