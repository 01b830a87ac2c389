"""Deterministic runs: the context switches torch's deterministic algorithms on for one run and
restores every setting; the option reaches the run from TrainConfig, GenConfig, CompareConfig and
the CLI."""

from __future__ import annotations

import os

import pytest
import torch
from tests.conftest import tiny_train_config

from deftune.determinism import CUBLAS_ENV, CUBLAS_VALUE, deterministic_algorithms
from deftune.train import TrainConfig, train_glue


def _settings() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, os.environ.get(CUBLAS_ENV))


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    before = _settings()
    yield before
    assert _settings()[:3] == before[:3]  # torch's own settings (monkeypatch restores the environment)


def test_switches_on_for_the_body_and_restores_after(clean):
    assert clean[0] is False
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ[CUBLAS_ENV] == CUBLAS_VALUE and torch.backends.cudnn.benchmark is False
    assert _settings() == clean


def test_restores_after_an_error_and_keeps_a_users_settings(clean, monkeypatch):
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    try:
        with pytest.raises(RuntimeError, match="boom"), deterministic_algorithms():
            assert os.environ[CUBLAS_ENV] == ":16:8"  # a value the user chose stays
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            raise RuntimeError("boom")
        assert torch.is_deterministic_algorithms_warn_only_enabled() and torch.backends.cudnn.benchmark
        assert os.environ[CUBLAS_ENV] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = clean[2]


def test_disabled_changes_nothing(clean):
    with deterministic_algorithms(False):
        assert _settings() == clean


def test_a_training_run_is_deterministic_inside_only(clean, tiny_setup, tmp_path, monkeypatch):
    import deftune.train.loop as loop

    seen = []
    real = loop._train_glue

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_glue", spy)
    a = train_glue(tiny_train_config(tiny_setup, tmp_path, deterministic=True, output_dir=None), progress=False)
    b = train_glue(tiny_train_config(tiny_setup, tmp_path, output_dir=None), progress=False)
    assert seen == [True, False]
    assert a.metric == b.metric and a.density == b.density  # the CPU repeats either way


def test_config_checks_the_flag_and_compare_passes_it_on():
    from deftune.compare.grid import CompareConfig, _config_recipe

    with pytest.raises(ValueError, match="deterministic must be True or False, got 'yes'"):
        TrainConfig(deterministic="yes")
    on, off = (CompareConfig(deterministic=d)._glue_config("sst2", "lora", 0.1, 0, None) for d in (True, False))
    assert on.deterministic is True and off.deterministic is False
    assert _config_recipe(on) == _config_recipe(off)  # rows of both settings share a results file


def test_the_cli_flag_reaches_the_config(monkeypatch):
    import deftune.train as train_pkg
    from deftune.cli import main

    seen = {}

    def stub(config, *args, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(train_pkg, "train_glue", stub)
    with pytest.raises(SystemExit):
        main(["train", "--task", "sst2", "--deterministic", "true"])
    assert seen["config"].deterministic is True


def test_generative_runs_take_the_flag_too(clean, monkeypatch):
    import deftune.generative.train as gen_train
    from deftune.compare.grid import CompareConfig
    from deftune.generative import GenConfig

    with pytest.raises(ValueError, match="deterministic must be True or False, got 1"):
        GenConfig(model="tiny-llama", deterministic=1)
    seen = []
    monkeypatch.setattr(gen_train, "_train_generative", lambda cfg: seen.append(torch.are_deterministic_algorithms_enabled()))
    gen_train.train_generative(GenConfig(model="tiny-llama", deterministic=True))
    gen_train.train_generative(GenConfig(model="tiny-llama"))
    assert seen == [True, False]
    grid = CompareConfig(tasks=("squad",), methods=("lora",), generative_model="tiny-llama", deterministic=True)
    assert grid._squad_config("lora", 0.0, 0, "x").deterministic is True
    with pytest.raises(ValueError, match="deterministic must be True or False, got 'no'"):
        CompareConfig(tasks=("squad",), methods=("lora",), generative_model="tiny-llama",
                      generative_options={"deterministic": "no"})
