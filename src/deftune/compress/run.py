"""Compress one fine-tuned run and report: per-layer errors, real packed bytes, dev metric."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from deftune.compress.model import QuantConfig, SparsityConfig, compress_
from deftune.compress.patterns import QuantPattern, parse_pattern


@dataclass
class CompressRunConfig:
    """One compression of a run directory.

    Attributes:
        run_dir: a fine-tuned run directory.
        pattern: quantization (``int4:g128:asym``) or sparsity (``nm:2:4``) pattern.
        method: ``rtn``/``none``, ``gptq`` (quantization) or ``mse`` (layer-wise refit).
        allocation: sparsity allocation across layers (uniform, global, erk).
        pack: pack quantized weights as real int4/int8 and report their bytes.
        evaluate: evaluate the dev metric before and after.
        calib_size: calibration sentences (used for reconstruction and output errors; 0: none).
        data_dir: GLUE folder (None: the run's). output: report JSON (None: not written).
        threads: torch threads.
    """

    run_dir: str
    pattern: str
    method: str = "rtn"
    allocation: str = "uniform"
    pack: bool = False
    evaluate: bool = True
    calib_size: int = 128
    data_dir: str | None = None
    output: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        from deftune.compress.sparsity import ALLOCATIONS

        methods = ("rtn", "none", "gptq", "mse")
        if self.method not in methods:
            raise ValueError(f"method must be one of {methods}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 0:
            raise ValueError(f"calib_size must be an integer >= 0, got {self.calib_size!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")

    def compress_config(self):
        pattern = parse_pattern(self.pattern)
        recon = "none" if self.method in ("rtn", "none") else self.method
        if isinstance(pattern, QuantPattern):
            if self.allocation != "uniform":
                raise ValueError(f"--allocation {self.allocation} spreads a sparsity level over layers; the "
                                 f"quantization pattern {self.pattern!r} takes none (leave it at uniform)")
            return QuantConfig(pattern, reconstruct=recon)
        if self.pack:
            raise ValueError("--pack stores quantized weights; it needs a quantization pattern such as int4:g128")
        return SparsityConfig(pattern, self.allocation, reconstruct=recon)


def compress_run(config: CompressRunConfig) -> dict:
    """Compress ``config.run_dir``'s model in memory and return the report (written if ``output``)."""
    from deftune.compress.sweep import _pack_check, evaluate, load_sweep_data
    from deftune.hardware import describe_line
    from deftune.runs import write_json_atomic

    torch.set_num_threads(config.threads)
    cc = config.compress_config()
    data = load_sweep_data(config.run_dir, config.data_dir, max(config.calib_size, 1), 0, None)
    calib = data.calibration if config.calib_size > 0 else None
    model = data.model
    out: dict = {"config": asdict(config), "hardware": describe_line()}
    if config.evaluate:
        out["metric_before"] = evaluate(model, data)
    t0 = time.perf_counter()
    report = compress_(model, cc, calibration=calib)
    out["compress_seconds"] = time.perf_counter() - t0
    out["report"] = report.to_dict()
    if config.evaluate:
        out["metric_after"] = evaluate(model, data)
    if config.pack:
        out["packed"] = _pack_check(model, data)
        if config.evaluate:
            out["metric_packed"] = evaluate(model, data)  # the real int4/int8 model on the whole dev set
    if config.output:
        write_json_atomic(config.output, out)
    return out
