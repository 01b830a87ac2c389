"""deftune.compress: weight quantization and sparsity of trained transformers.

Tensor level::

    from deftune.compress import parse_pattern, choose_qparams, quantize, dequantize, fake_quantize
    from deftune.compress import compute_mask, allocate, sqnr_db, relative_error, ste

Model level (in place, torchao-style verb + config)::

    report = compress_(model, QuantConfig("int4:g128:asym", reconstruct="gptq"), calibration=batches)
    pack_(model)                        # real int4/int8 storage, bytes measured
    compress_(model, SparsityConfig("nm:2:4"))

Training (QAT/SAT, QLoRA-style PEFT on a frozen compressed base, gradual magnitude pruning, SET/RigL)
are :class:`deftune.train.TrainExtension` objects in :mod:`deftune.compress.training`; sweeps are in
:mod:`deftune.compress.sweep` (results and plots in :mod:`deftune.compress.results`).
"""

from deftune.compress.errors import relative_error, sqnr_db
from deftune.compress.gptq import GPTQOptions, gptq_quantize
from deftune.compress.layer import CompressedLinear, MaskCompressor, QuantCompressor
from deftune.compress.model import (
    COMPRESSIONS,
    CompressReport,
    LayerReport,
    QuantConfig,
    SparsityConfig,
    check_compressible,
    compress_,
    compressed_layers,
    decompress_,
    default_filter,
    register_compression,
    select_linears,
)
from deftune.compress.packed import PackedLinear, PackReport, pack_, pack_int4, unpack_int4
from deftune.compress.patterns import (
    NM,
    Block,
    Channel,
    PatternError,
    QuantPattern,
    Threshold,
    Unstructured,
    parse_pattern,
    parse_quant,
    parse_sparsity,
    with_sparsity,
)
from deftune.compress.quant import QuantParams, choose_qparams, dequantize, fake_quantize, quantize
from deftune.compress.reconstruct import LayerCalibration, MSEOptions, capture_inputs, reconstruct_mse
from deftune.compress.sparsity import allocate, compute_mask, erk_densities, register_mask, sparsity_of
from deftune.compress.ste import ste
from deftune.compress.training import (
    CompressionExtension,
    DynamicSchedule,
    DynamicSparsity,
    FinetuneConfig,
    GradualPruning,
    PruningSchedule,
    finetune,
    freeze_quantizers_,
    polynomial_sparsity,
)

__all__ = [
    "COMPRESSIONS",
    "CompressionExtension",
    "DynamicSchedule",
    "DynamicSparsity",
    "FinetuneConfig",
    "GradualPruning",
    "PruningSchedule",
    "finetune",
    "freeze_quantizers_",
    "polynomial_sparsity",
    "NM",
    "Block",
    "Channel",
    "CompressReport",
    "CompressedLinear",
    "GPTQOptions",
    "LayerCalibration",
    "LayerReport",
    "MSEOptions",
    "MaskCompressor",
    "PackReport",
    "PackedLinear",
    "PatternError",
    "QuantCompressor",
    "QuantConfig",
    "QuantParams",
    "QuantPattern",
    "SparsityConfig",
    "Threshold",
    "Unstructured",
    "allocate",
    "capture_inputs",
    "check_compressible",
    "choose_qparams",
    "compress_",
    "compressed_layers",
    "compute_mask",
    "decompress_",
    "default_filter",
    "dequantize",
    "erk_densities",
    "fake_quantize",
    "gptq_quantize",
    "pack_",
    "pack_int4",
    "parse_pattern",
    "parse_quant",
    "parse_sparsity",
    "quantize",
    "reconstruct_mse",
    "register_mask",
    "register_compression",
    "relative_error",
    "select_linears",
    "sparsity_of",
    "sqnr_db",
    "ste",
    "unpack_int4",
    "with_sparsity",
]
