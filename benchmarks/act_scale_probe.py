"""What sharpening alone costs: set every learned activation scale to ``s`` (no training) and measure.

``act(s·x)/s`` tends to ``relu`` as ``s`` grows, so this measures, without any adaptation, what the
exact-zero region bought by a scale costs the model — the starting point that DEFT training with
``act_scale`` then repairs (``docs/recipe.md``), and the reason the approach does not carry over to
SiLU models (``docs/generative.md``: SiLU is exactly zero only below about −88.7).

* ``--run-dir RUN``: a GLUE run directory (dev metric, e.g. ``runs/demo/peft``);
* ``--causal-lm NAME``: a causal LM (``smollm2``), perplexity on held-out SQuAD paragraphs
  (articles 24–47 of the dev file, as ``deftune calibrate --data squad``).

Prints a table and writes JSON::

    python benchmarks/act_scale_probe.py --run-dir runs/demo/peft --data-dir ../shared/data/glue
    python benchmarks/act_scale_probe.py --causal-lm smollm2 --squad-file ../shared/data/squad/dev-v1.1.json
"""

from __future__ import annotations

import argparse
import math

import torch


def set_scales(model, s: float) -> None:
    from deftune.act_scale import add_act_scales, scaled_activations

    wrappers = scaled_activations(model) or add_act_scales(model, "layer", trainable=False)
    with torch.no_grad():
        for w in wrappers.values():
            w.log_scale.fill_(math.log(s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="GLUE run directory (deftune train / demo output)")
    src.add_argument("--causal-lm", help="causal LM name or folder (e.g. smollm2)")
    p.add_argument("--scales", default="1,2,3,5,10,30,100", help="comma-separated s values")
    p.add_argument("--data-dir", default=None, help="GLUE folder (--run-dir)")
    p.add_argument("--squad-file", default=None, help="SQuAD v1.1 dev JSON (--causal-lm)")
    p.add_argument("--eval-size", type=int, default=32, help="held-out paragraphs (--causal-lm)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per paragraph (--causal-lm)")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args()

    from deftune.density import measure_density
    from deftune.hardware import describe
    from deftune.runs import write_json_atomic

    if args.run_dir:
        from deftune.data.glue import get_task, load_glue, make_batches
        from deftune.train import evaluate_batches, load_run

        model, tok, cfg = load_run(args.run_dir)
        task = get_task(cfg.task)
        batches = make_batches(load_glue(task, "dev", args.data_dir or cfg.data_dir), tok, batch_size=128, max_length=128,
                               regression=task.is_regression)
        name = task.metrics[0]

        def evaluate(m):
            r = evaluate_batches(m, batches, task, thresholds=(), zeroed=False)
            return r.metrics[name], r.density.overall
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deftune import models
        from deftune.calibration_study import perplexity, squad_paragraphs, text_batches

        path = models.resolve(args.causal_lm)[0]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        batches = text_batches(squad_paragraphs(args.squad_file, "eval", args.eval_size), tok, 8, args.max_length)
        name = "perplexity"

        def evaluate(m):
            return perplexity(m, batches), measure_density(m, batches).overall

    rows = []
    print(f"{'s':>6} {name:>12} {'exact density':>14}")
    for s in (float(v) for v in args.scales.split(",")):
        set_scales(model, s)
        metric, density = evaluate(model)
        rows.append({"s": s, name: metric, "exact_density": density})
        print(f"{s:>6g} {metric:>12.2f} {density:>14.4f}", flush=True)
    write_json_atomic(args.out, {"source": args.run_dir or args.causal_lm, "metric": name, "rows": rows,
                                 "hardware": describe("cpu"), "note": "every layer's scale set to s, no training"})


if __name__ == "__main__":
    main()
