"""Recipe search harness for the demo (MiniLM + LoRA on SST-2, PEFT vs DEFT).

Trains one run per entry of a JSON list of configs and appends one JSON line per run (dev accuracy,
exact / thresholded density, per-layer density, accuracy with |a| <= τ zeroed). It exposes knobs the
production loop keeps fixed, to explore them quickly on a GPU:

* ``targets`` (LoRA modules), ``r``, ``bias`` (peft's bias option), ``dora``;
* ``lr``, ``bias_lr`` (biases), ``int_lr`` (parameters of the MLP up-projection), ``head_lr``;
* ``alpha``, ``schedule``, ``warmup``, ``loss``, ``eps``, ``beta`` (the density loss);
* ``cool`` (the last N steps without the density term), ``skip`` (leading tokens left out of the
  loss), ``lw`` (per-layer density-loss weights), ``route`` (density gradients only into the MLP
  up-projection's parameters, through a second ``autograd.grad``);
* ``scale`` (learned activation scales, :mod:`deftune.act_scale`), ``scale_shape`` (``neuron``
  or ``layer``), ``scale_lr``, ``scale_wd`` (AdamW weight decay on the log-scales), and
  ``route="scale"`` (density gradients only into the scales; task gradients everywhere);
* ``steps``, ``subset``, ``seed``.

Usage (results of the search are in docs/results/recipe_search.json and docs/recipe.md)::

    PYTHONPATH=src python3 benchmarks/recipe_search.py configs.json --model MODEL_DIR \\
        --data-dir GLUE_DIR --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run(c: dict, model_dir: str, data: dict, device: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from deftune import DensityLossConfig, DensityRegularizer
    from deftune.data import compute_metrics, make_batches, subsample
    from deftune.density import ActivationRecorder
    from deftune.train.evaluate import zero_small_activations

    torch.manual_seed(c.get("seed", 0))
    tok = data["tokenizer"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, dtype=torch.float32)
    lora = LoraConfig(task_type="SEQ_CLS", r=c.get("r", 8), lora_alpha=2 * c.get("r", 8), target_modules=c["targets"],
                      bias=c.get("bias", "none"), lora_dropout=0.0, use_dora=c.get("dora", False))
    model = get_peft_model(model, lora).to(device)
    if c.get("scale"):
        from deftune.act_scale import add_act_scales

        add_act_scales(model, "layer" if c.get("scale_shape") == "layer" else "neuron")
    steps = c["steps"]
    train = subsample(data["train"], c.get("subset", 8000), seed=0)
    batches = make_batches(train, tok, batch_size=32, max_length=64, shuffle=True, seed=c.get("seed", 0))

    groups: dict[str, list] = {"head": [], "bias": [], "int": [], "rest": [], "scale": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = ("scale" if name.endswith("log_scale") else "head" if "classifier" in name
                   else "bias" if name.endswith(".bias")
                   else "int" if "intermediate" in name else "rest")
            groups[key].append(p)
    lrs = {"head": c.get("head_lr", c["lr"]), "bias": c.get("bias_lr", c["lr"]),
           "int": c.get("int_lr", c["lr"]), "rest": c["lr"], "scale": c.get("scale_lr", 0.03)}
    opt = torch.optim.AdamW([{"params": v, "lr": lrs[k], "weight_decay": c.get("scale_wd", 0.0) if k == "scale" else 0.0}
                             for k, v in groups.items() if v], weight_decay=0.0)
    warm = 30
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (max(0.0, (steps - s) / max(1, steps - warm)) if s >= warm else 1))
    cfg = DensityLossConfig(alpha=c["alpha"], schedule=c.get("schedule", "constant"), warmup_steps=c.get("warmup", 0),
                            loss=c.get("loss", "l0"), eps=c.get("eps", 1e-7), beta=c.get("beta", 10.0))
    reg = DensityRegularizer(model, cfg, track_stats=False, skip_leading=c.get("skip", 0))
    if c.get("lw"):
        reg.layer_weights = {f"encoder.{i}": torch.tensor(float(w), device=device) for i, w in enumerate(c["lw"])}

    model.train()
    start = time.time()
    with reg:
        for step in range(steps):
            batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
            out = model(**batch)
            loss, parts = reg.total_loss(out.loss, step)
            if step >= steps - c.get("cool", 0):
                loss = out.loss + 0.0 * loss
            if c.get("route") == "scale":
                grads = torch.autograd.grad(loss - out.loss, groups["scale"], retain_graph=True, allow_unused=True)
                out.loss.backward()
                for p, g in zip(groups["scale"], grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            elif c.get("route"):
                own = groups["int"] + groups["bias"]
                grads = torch.autograd.grad(loss - out.loss, own, retain_graph=True, allow_unused=True)
                out.loss.backward()
                for p, g in zip(own, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            else:
                loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    seconds = time.time() - start

    model.eval()
    res: dict = {}
    for tau in (None, 1e-3, 1e-2):
        preds, refs = [], []
        with torch.no_grad(), ActivationRecorder(model, thresholds=(1e-3, 1e-2)) as rec:
            ctx = zero_small_activations(model, tau) if tau is not None else None
            if ctx is not None:
                ctx.__enter__()
            try:
                for b in data["dev_batches"]:
                    b = {k: v.to(device) for k, v in b.items()}
                    logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
                    preds += logits.argmax(-1).tolist()
                    refs += b["labels"].tolist()
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
            r = rec.result()
        acc = compute_metrics(["accuracy"], preds, refs)["accuracy"]
        if tau is None:
            res.update(acc=acc, exact=r.overall, thr3=r.thresholded_overall(1e-3), thr2=r.thresholded_overall(1e-2),
                       per_layer={k: round(v, 4) for k, v in r.exact_per_layer.items()})
        else:
            res[f"acc_zero_{tau:g}"] = acc
    res.update(cfg=c, train_s=seconds, final_task=parts.task, final_density_loss=parts.density)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", help="JSON file: a list of config dicts")
    p.add_argument("--model", required=True, help="MiniLM folder (config, tokenizer, safetensors)")
    p.add_argument("--data-dir", required=True, help="GLUE folder holding SST-2/")
    p.add_argument("--out", default="recipe_search.jsonl", help="JSON-lines output (appended)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from deftune.data import load_glue, make_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    dev = load_glue("sst2", "dev", args.data_dir)
    data = {"tokenizer": tok, "train": load_glue("sst2", "train", args.data_dir),
            "dev_batches": make_batches(dev, tok, batch_size=256, max_length=128)}
    with open(args.out, "a") as f:
        for c in json.load(open(args.configs)):
            r = run(c, args.model, data, device)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"acc {r['acc']:.1f}  exact {r['exact']:.3f}  {json.dumps(c)}", flush=True)


if __name__ == "__main__":
    main()
