"""Training-step overhead of DEFT over plain PEFT on the same batches.

Times one optimizer step (forward, loss, backward, AdamW) of MiniLM + LoRA on SST-2 batches in three
variants, interleaved step by step so that machine noise hits all alike:

* ``peft``       — plain PEFT: no deftune hooks at all;
* ``deft_a0``    — deftune's path with α = 0 (hooks + density term computed, weighted by 0);
* ``deft``       — DEFT, α = 1 (the ``l0`` loss of the paper).

The model carries the demo recipe's learned activation scales (``--act-scale layer``, default) in
all three variants, as the demo's PEFT and DEFT runs both do; ``--act-scale none`` drops them.

Prints a table and writes ``docs/results/train_overhead.json`` with ``ratio`` = median(deft) /
median(peft). Run: ``python benchmarks/train_overhead.py --data-dir ../shared/data/glue``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="GLUE folder (default $DEFTUNE_DATA_DIR)")
    p.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--act-scale", default="layer", choices=("none", "layer", "neuron"),
                   help="learned activation scales on the model (all variants)")
    p.add_argument("--out", default="docs/results/train_overhead.json", help="JSON output")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from deftune import models
    from deftune.data.glue import load_glue, make_batches, subsample
    from deftune.hardware import describe
    from deftune.losses import DensityLossConfig
    from deftune.methods import MethodConfig, apply_method
    from deftune.regularizer import DensityRegularizer
    from deftune.runs import write_json_atomic

    tok = models.load_tokenizer("minilm")
    examples = subsample(load_glue("sst2", "train", args.data_dir), args.batch_size * 8, seed=0)
    batches = make_batches(examples, tok, batch_size=args.batch_size, max_length=64)

    torch.manual_seed(0)
    model = apply_method(models.load_for_classification("minilm", 2), MethodConfig(name="lora", act_scale=args.act_scale))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    regs = {
        "peft": None,
        "deft_a0": DensityRegularizer(model, DensityLossConfig(alpha=0.0), track_stats=False),
        "deft": DensityRegularizer(model, DensityLossConfig(alpha=1.0), track_stats=False),
    }

    def step(name: str, batch: dict) -> float:
        reg = regs[name]
        start = time.perf_counter()
        with reg if reg is not None else nullcontext():
            out = model(**batch)
            loss = out.loss if reg is None else reg.total_loss(out.loss, 0)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in regs}
    for i in range(args.warmup + args.repeats):
        batch = batches[i % len(batches)]
        for name in regs:  # interleaved: the same batch for every variant
            t = step(name, batch)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["deft"] / med["peft"]
    print(f"{'variant':<10}{'median s/step':>15}{'vs peft':>10}")
    for k, v in med.items():
        print(f"{k:<10}{v:>15.4f}{v / med['peft']:>10.3f}")
    hw = describe("cpu")  # the model never leaves the CPU
    print(f"hardware: {hw}")
    write_json_atomic(args.out, {
        "ratio": ratio, "ratio_alpha0_path": med["deft_a0"] / med["peft"], "median_seconds": med,
        "repeats": args.repeats, "batch_size": args.batch_size, "model": f"minilm + lora (query,value), act_scale={args.act_scale}",
        "hardware": hw, "command": " ".join(["python", *sys.argv]),
    })


if __name__ == "__main__":
    main()
