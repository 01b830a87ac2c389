"""Generic checks over a table of (model, method) cases, in the style of peft's test matrix.

For every case: only the method's parameters (+ task head) train; the method starts at the base
model where it should; save -> load onto a fresh base gives identical outputs; merged == unmerged
(or merge is rejected clearly); the density loss reaches the method's parameters; the density
recorder sees real tokens only; virtual tokens show up in the activations as announced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
from methods_tiny import BUILDERS, tiny_batch

from deftune.arch import find_activation_sites
from deftune.density import ActivationRecorder
from deftune.losses import DensityLossConfig
from deftune.methods import (
    MergeNotSupportedError,
    MethodConfig,
    apply_method,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
    virtual_token_count,
)
from deftune.regularizer import DensityRegularizer

N_VIRTUAL = 3
HEAD = "classifier"


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    Attributes:
        trainable: regex alternatives; every trainable parameter matches one, and each matches one.
        merge: ``fold`` (weights change, outputs don't), ``noop`` (already merged) or ``reject``.
        starts_at_base: the freshly adapted model computes exactly what the base model computes.
        beyond_density: method parameters downstream of the last activation site (the density
            loss cannot reach them); regex.
    """

    id: str
    model: str
    options: dict = field(default_factory=dict)
    trainable: tuple[str, ...] = ()
    merge: str = "fold"
    starts_at_base: bool = True
    virtual_tokens: int = 0
    beyond_density: str | None = None
    marks: tuple = ()

    @property
    def config(self) -> MethodConfig:
        return MethodConfig(**self.options)


_LAST_BERT_MLP_OUT = r"layer\.1\.output\.dense"
_LAST_LLAMA_MLP_OUT = r"layers\.1\.mlp\.down_proj"
_LAST_GPT2_MLP_OUT = r"h\.1\.mlp\.c_proj"

CASES = [
    Case("bert-lora", "bert", {"name": "lora"}, (r"\.lora_A\.", r"\.lora_B\.", HEAD)),
    Case(
        "bert-dora", "bert", {"name": "dora"}, (r"\.lora_A\.", r"\.lora_B\.", "lora_magnitude_vector", HEAD)
    ),
    Case("bert-ia3", "bert", {"name": "ia3"}, (r"\.ia3_l\.", HEAD), beyond_density=_LAST_BERT_MLP_OUT),
    Case(
        "bert-prefix",
        "bert",
        {"name": "prefix", "num_virtual_tokens": N_VIRTUAL},
        ("prompt_encoder", HEAD),
        merge="reject",
        starts_at_base=False,
    ),
    Case(
        "bert-prompt",
        "bert",
        {"name": "prompt", "num_virtual_tokens": N_VIRTUAL},
        ("prompt_encoder", HEAD),
        merge="reject",
        starts_at_base=False,
        virtual_tokens=N_VIRTUAL,
    ),
    Case(
        "bert-ptuning",
        "bert",
        {"name": "ptuning", "num_virtual_tokens": N_VIRTUAL},
        (r"prompt_encoder\.default\.embedding", r"prompt_encoder\.default\.mlp_head", HEAD),
        merge="reject",
        starts_at_base=False,
        virtual_tokens=N_VIRTUAL,
    ),
    # reduction factor 4: a 2-unit ReLU bottleneck (32 // 16) is easily dead on a random tiny model
    Case(
        "bert-adapter-pfeiffer",
        "bert",
        {"name": "adapter", "reduction_factor": 4},
        (r"output\.dense\.adapter_down", r"output\.dense\.adapter_up", HEAD),
        merge="reject",
        beyond_density=_LAST_BERT_MLP_OUT,
    ),
    Case(
        "bert-adapter-houlsby-parallel-gelu",
        "bert",
        {
            "name": "adapter",
            "adapter_kind": "houlsby",
            "adapter_placement": "parallel",
            "adapter_activation": "gelu",
        },
        (r"attention\.output\.dense\.adapter_", r"\.\d\.output\.dense\.adapter_", HEAD),
        merge="reject",
        beyond_density=_LAST_BERT_MLP_OUT,
    ),
    Case(
        "bert-adapter-houlsby-linear",
        "bert",
        {"name": "adapter", "adapter_kind": "houlsby", "adapter_activation": "identity"},
        (r"attention\.output\.dense\.adapter_", r"\.\d\.output\.dense\.adapter_", HEAD),
        beyond_density=_LAST_BERT_MLP_OUT,
    ),
    Case(
        "bert-adapter-pfeiffer-parallel-linear",
        "bert",
        {"name": "adapter", "adapter_placement": "parallel", "adapter_activation": "identity"},
        (r"output\.dense\.adapter_", HEAD),
        beyond_density=_LAST_BERT_MLP_OUT,
    ),
    Case(
        "bert-bitfit",
        "bert",
        {"name": "bitfit"},
        (r"\.bias$", HEAD),
        merge="noop",
        beyond_density=r"layer\.1\.output\.|pooler",
    ),
    Case(
        "bert-full",
        "bert",
        {"name": "full"},
        (r".",),
        merge="noop",
        beyond_density=r"layer\.1\.output\.|pooler",
    ),
    Case("llama-lora", "llama", {"name": "lora"}, (r"\.lora_A\.", r"\.lora_B\.")),
    Case("llama-dora", "llama", {"name": "dora"}, (r"\.lora_A\.", r"\.lora_B\.", "lora_magnitude_vector")),
    Case("llama-ia3", "llama", {"name": "ia3"}, (r"\.ia3_l\.",), beyond_density=_LAST_LLAMA_MLP_OUT),
    Case(
        "llama-prefix",
        "llama",
        {"name": "prefix", "num_virtual_tokens": N_VIRTUAL},
        ("prompt_encoder",),
        merge="reject",
        starts_at_base=False,
    ),
    Case(
        "llama-prompt",
        "llama",
        {"name": "prompt", "num_virtual_tokens": N_VIRTUAL},
        ("prompt_encoder",),
        merge="reject",
        starts_at_base=False,
        virtual_tokens=N_VIRTUAL,
    ),
    Case(
        "llama-adapter-houlsby",
        "llama",
        {"name": "adapter", "adapter_kind": "houlsby", "reduction_factor": 4},
        (r"o_proj\.adapter_", r"down_proj\.adapter_"),
        merge="reject",
        beyond_density=_LAST_LLAMA_MLP_OUT,
    ),
]
# GPT-2's Conv1D projections (weight (in, out)): merge, save / load and the density gradient must
# hold for them too (peft needs fan_in_fan_out=True there)
CASES += [
    Case("gpt2-lora", "gpt2", {"name": "lora"}, (r"\.lora_A\.", r"\.lora_B\.")),
    Case("gpt2-ia3", "gpt2", {"name": "ia3"}, (r"\.ia3_l\.",), beyond_density=_LAST_GPT2_MLP_OUT),
]
PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _adapted(case: Case) -> torch.nn.Module:
    return apply_method(BUILDERS[case.model](), case.config).eval()


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Stand-in for training: move every trainable parameter (zero-initialised ones included)."""
    g = torch.Generator().manual_seed(seed)
    for p in _trainable(model).values():
        p.add_(0.2 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def _logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    batch = tiny_batch(kind)
    batch.pop("labels")
    return model(**batch).logits


@pytest.mark.parametrize("case", PARAMS)
def test_only_method_parameters_train(case: Case):
    model = _adapted(case)
    names = list(_trainable(model))
    assert names, "nothing trains"
    stray = [n for n in names if not any(re.search(p, n) for p in case.trainable)]
    assert not stray, f"parameters outside the method train: {stray[:5]}"
    absent = [p for p in case.trainable if not any(re.search(p, n) for n in names)]
    assert not absent, f"no trainable parameter matches {absent}"
    # ... and nothing the method owns stays frozen: the whole task head (weight and bias; peft keeps
    # a frozen copy as ``original_module``), and for BitFit every bias
    whole = [HEAD] if HEAD in case.trainable else []
    whole += [r"\.bias$"] if case.config.name == "bitfit" else []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and "original_module" not in n
              and any(re.search(w, n) for w in whole)]
    assert not frozen, f"parameters the method owns stay frozen: {frozen[:5]}"
    if case.config.name == "full":
        assert len(names) == len(list(model.parameters()))
    else:
        assert any(not p.requires_grad for p in model.parameters()), "the base model must be frozen"


@pytest.mark.parametrize("case", PARAMS)
def test_adapted_model_starts_at_base(case: Case):
    base = _logits(BUILDERS[case.model](), case.model)
    adapted = _logits(_adapted(case), case.model)
    # peft's causal-LM logits include the virtual positions of prompt / P-tuning
    virtual = case.virtual_tokens if case.model != "bert" else 0
    assert adapted.shape[1] == base.shape[1] + virtual
    if case.starts_at_base:
        torch.testing.assert_close(adapted, base, rtol=0, atol=1e-6)
    else:  # learned virtual tokens / prefixes are random at start
        assert not torch.allclose(adapted[:, virtual:], base, atol=1e-4)


@pytest.mark.parametrize("case", PARAMS)
def test_save_load_round_trip(case: Case, tmp_path):
    model = _adapted(case)
    _perturb(model)
    expected = _logits(model, case.model)
    save_adapter(model, tmp_path)
    assert (tmp_path / "deftune_method.json").is_file()

    loaded = load_adapter(BUILDERS[case.model](), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, case.model), expected, rtol=0, atol=1e-6)
    assert not _trainable(loaded), "load_adapter(trainable=False) must freeze everything"
    untrained = _logits(_adapted(case), case.model)
    assert not torch.allclose(untrained, expected, atol=1e-4), "the perturbation did not change outputs"

    resumed = load_adapter(BUILDERS[case.model](), tmp_path, trainable=True).eval()
    assert set(_trainable(resumed)) == set(_trainable(model))
    torch.testing.assert_close(_logits(resumed, case.model), expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate")
@pytest.mark.parametrize("case", PARAMS)
def test_merge_unmerge(case: Case):
    model = _adapted(case)
    _perturb(model)
    before = _logits(model, case.model)
    if case.merge == "reject":
        with pytest.raises(
            MergeNotSupportedError, match=r"cannot (be )?(merge|folded)|non-linear|nothing to fold"
        ):
            merge_adapter(model)
        return
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapter(model)
    torch.testing.assert_close(_logits(model, case.model), before, rtol=0, atol=1e-5)
    changed = [k for k, v in model.state_dict().items() if k not in state or not torch.equal(v, state[k])]
    assert bool(changed) == (case.merge == "fold"), changed[:5]
    unmerge_adapter(model)
    torch.testing.assert_close(_logits(model, case.model), before, rtol=0, atol=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", PARAMS)
def test_density_loss_reaches_method_parameters(case: Case):
    model = _adapted(case)
    _perturb(model)  # zero-initialised factors (LoRA B, adapter up) would block the gradient
    reg = DensityRegularizer(model, DensityLossConfig(alpha=1.0), skip_leading=virtual_token_count(model))
    with reg:
        out = model(**tiny_batch(case.model))
        loss, parts = reg.total_loss(out.loss * 0.0, 0)  # the density term alone
    loss.backward()
    assert parts.density > 0
    checked = 0
    for name, p in _trainable(model).items():
        if HEAD in name or (case.beyond_density and re.search(case.beyond_density, name)):
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no density gradient reaches {name}"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id) for c in CASES]
)
def test_density_counts_real_tokens_only(case: Case):
    model = _adapted(case)
    batch = tiny_batch(case.model)
    with ActivationRecorder(model, skip_leading=virtual_token_count(model)) as rec, torch.no_grad():
        model(**batch)
    real = int(batch["attention_mask"].sum())
    assert {name: c.tokens for name, c in rec.counts.items()} == {name: real for name in rec.counts}


@pytest.mark.parametrize("case", PARAMS)
def test_virtual_tokens_lead_the_activations(case: Case):
    model = _adapted(case)
    assert virtual_token_count(model) == case.virtual_tokens
    site = find_activation_sites(model)[0]
    shapes = []
    handle = model.get_submodule(site.module_path).register_forward_hook(
        lambda m, a, out: shapes.append(out.shape)
    )
    try:
        _logits(model, case.model)
    finally:
        handle.remove()
    assert shapes[0][1] == tiny_batch(case.model)["input_ids"].shape[1] + case.virtual_tokens


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_gpt2_conv1d_targets_are_declared_fan_in_fan_out(name):
    """deftune tells peft that GPT-2's Conv1D weights are (in, out); peft would otherwise fix the
    flag itself with a warning (for LoRA) or compute the wrong shape."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_method(BUILDERS["gpt2"](), MethodConfig(name=name))
    assert model.peft_config["default"].fan_in_fan_out is True
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
