"""DEFT for decoder-only and encoder-decoder transformers, on generative (SQuAD-style) QA.

Public API::

    from deftune.generative import GenConfig, train_generative
    result = train_generative(GenConfig(model="smollm2", method="lora", alpha=1.0, loss="l0",
                                        data_dir="../shared/data/squad", output_dir="runs/deft"))
    print(result.summary())

Parts: :mod:`.config` (GenConfig), :mod:`.format` (prompt -> answer, answer-only labels),
:mod:`.train` (the loop), :mod:`.evaluate` (greedy EM / F1, density, perplexity), :mod:`.relufy`
(ProSparse ReLU-fication), :mod:`.peft_methods` (PEFT registry), :mod:`.models` (SmolLM2, tiny models).
"""

from deftune.generative.config import GenConfig
from deftune.generative.evaluate import (
    EvalReport,
    evaluate_generative,
    generate_answers,
    greedy_generate,
    perplexity,
    teacher_forced_density,
)
from deftune.generative.format import encode_example, training_batch
from deftune.generative.models import load_generative
from deftune.generative.peft_methods import PEFT_METHODS, register_peft_method
from deftune.generative.relufy import ACTIVATIONS, relufy
from deftune.generative.train import (
    GenRunResult,
    evaluate_generative_run,
    load_generative_run,
    train_generative,
)

__all__ = [
    "ACTIVATIONS",
    "EvalReport",
    "GenConfig",
    "GenRunResult",
    "PEFT_METHODS",
    "encode_example",
    "evaluate_generative",
    "evaluate_generative_run",
    "generate_answers",
    "greedy_generate",
    "load_generative",
    "load_generative_run",
    "perplexity",
    "register_peft_method",
    "relufy",
    "teacher_forced_density",
    "train_generative",
    "training_batch",
]
