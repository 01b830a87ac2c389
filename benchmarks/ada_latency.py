"""ADA-DEFT benchmark: train with gates, skip MLP blocks, measure dense vs skipped in one run.

Three sub-commands (all write JSON atomically; see docs/ada.md for the results and commands):

  train   DEFT + ADA gates on a GLUE task (``train_glue`` with ``AdaExtension``) -> a run directory
          python benchmarks/ada_latency.py train --output-dir runs/ada-sst2 --steps 300

  minilm  on a trained run (CPU): metric vs blocks skipped (Pareto, gate- and density-ranked),
          and for the chosen policy dense vs skipped latency (median of interleaved repeats), peak
          RSS (each model in a fresh process) and parameter bytes
          python benchmarks/ada_latency.py minilm --run-dir runs/ada-sst2 --json docs/results/ada.json

  llama   an 8B-shaped LLaMA with RANDOM weights (speed and memory only; no task metric): blocks
          chosen by the training-free density policy, prefill and decode latency and
          torch.cuda.max_memory_allocated, dense vs skipped
          PYTHONPATH=src python3 benchmarks/ada_latency.py llama --device cuda --llama-8b-shape --json $OUT/ada_llama8b.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deftune.runs import write_json_atomic


def pct(new: float, old: float) -> float:
    return 100.0 * (new / old - 1.0)


# ---- train ---------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from deftune.ada import AdaConfig, AdaExtension
    from deftune.train import TrainConfig, train_glue

    torch.set_num_threads(args.threads)
    ada = AdaConfig(
        gate=args.gate,
        penalty=args.penalty,
        logit_scale=args.logit_scale,
        init=args.init,
        density_weighting=args.density_weighting,
        penalty_warmup_steps=args.penalty_warmup_steps,
    )
    cfg = TrainConfig(
        task=args.task,
        model="minilm",
        method="lora",
        alpha=args.alpha,
        steps=args.steps,
        batch_size=32,
        max_length=64,
        lr=args.lr,
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        seed=args.seed,
        name=Path(args.output_dir).name,
    )
    ext = AdaExtension(ada)
    start = time.perf_counter()
    result = train_glue(cfg, extensions=[] if args.no_gates else [ext], progress=False)
    summary = {
        "run": args.output_dir,
        "metric": result.metric,
        "density": result.density["exact"],
        "seconds": time.perf_counter() - start,
    }
    if not args.no_gates:
        summary |= {
            "gates": ext.gate_values(),
            "density_weighting_bound": ext.log()["ada/density_weighting_bound"],
        }
    print(json.dumps(summary, indent=2))


# ---- minilm (CPU) ------------------------------------------------------------------------------


def _fixed_inputs(tokenizer, cfg, batch: int, seq: int) -> dict:
    """``batch`` dev sentences padded/truncated to exactly ``seq`` tokens (a fixed shape to time)."""
    from deftune.data.glue import load_glue

    examples = load_glue(cfg.task, "dev", cfg.data_dir)[:batch]
    enc = tokenizer(
        [e.text_a for e in examples],
        padding="max_length",
        truncation=True,
        max_length=seq,
        return_tensors="pt",
    )
    return dict(enc)


def _child_memory(
    model_dir: str, batch: int, seq: int, threads: int, tokenizer_dir: str, task: str, data_dir: str | None
) -> dict:
    """Run one model in a fresh process; return its peak RSS (bytes) etc."""
    cmd = [
        sys.executable,
        __file__,
        "_child",
        "--model-dir",
        model_dir,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--threads",
        str(threads),
        "--tokenizer-dir",
        tokenizer_dir,
        "--task",
        task,
        *(["--data-dir", data_dir] if data_dir is not None else []),  # None: $DEFTUNE_DATA_DIR or the Hub
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_child(args: argparse.Namespace) -> None:
    import psutil
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    from deftune.ada import load_skipped, param_bytes
    from deftune.ada.measure import peak_rss_bytes
    from deftune.data.glue import load_glue

    rss_start = psutil.Process().memory_info().rss
    model, plan = load_skipped(args.model_dir)
    rss_loaded = psutil.Process().memory_info().rss
    tok = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    examples = load_glue(args.task, "dev", args.data_dir)[: args.batch]
    inputs = dict(
        tok(
            [e.text_a for e in examples],
            padding="max_length",
            truncation=True,
            max_length=args.seq,
            return_tensors="pt",
        )
    )
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "peak_rss": peak,
                "rss_before_load": rss_start,
                "rss_after_load": rss_loaded,
                "param_bytes": param_bytes(model),
                "skipped": plan.skip,
            }
        )
    )


def _pareto(model, scores: dict, score_name: str, batches, task) -> list[dict]:
    from deftune.ada import SkipConfig, SkipPlan, param_bytes, plan_skip, skip_mlps_
    from deftune.ada.pipeline import _metric

    rows = []
    n = len(scores)
    kw = {"gates": scores} if score_name == "gate" else {"density": scores}
    for k in range(n + 1):
        plan = plan_skip(model, SkipConfig(policy="topk", keep=n - k, score=score_name), **kw)
        m = copy.deepcopy(model)
        skip_mlps_(m, SkipPlan(skip=plan.skip), fold_gates=False)
        rows.append(
            {
                "skipped": k,
                "blocks": plan.skip,
                "metric": _metric(m, batches, task),
                "param_bytes": param_bytes(m),
            }
        )
        print(f"  {score_name:>7}-ranked, {k} skipped {plan.skip}: {rows[-1]['metric']:.2f}", flush=True)
        del m
    return rows


def cmd_minilm(args: argparse.Namespace) -> None:
    from deftune.ada import (
        SkipConfig,
        SkipPlan,
        density_scores,
        load_skipped,
        param_bytes,
        plan_skip,
        save_skipped,
        skip_mlps_,
    )
    from deftune.ada.measure import compare_latency
    from deftune.ada.pipeline import _metric, _train_batches, prepare_run
    from deftune.data.glue import get_task
    from deftune.hardware import describe
    from deftune.train import eval_batches

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer, cfg, gates = prepare_run(args.run_dir)
    task = get_task(cfg.task)
    batches = eval_batches(cfg, tokenizer)
    train = _train_batches(cfg, tokenizer, args.density_examples)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in train]
    density = density_scores(model, no_labels, args.density_threshold)
    print("gates:", gates, "\ndensity:", density, flush=True)

    pareto = {}
    if gates is not None:
        pareto["gate"] = _pareto(model, gates, "gate", batches, task)
    pareto["density"] = _pareto(model, density, "density", batches, task)

    policy = SkipConfig(
        policy=args.policy,
        tau=args.tau,
        keep=args.keep,
        score=args.score,
        tau_density=args.tau_density,
        density_threshold=args.density_threshold,
    )
    plan = plan_skip(model, policy, gates=gates, density=density)
    dense_metric = _metric(model, batches, task)
    skipped = copy.deepcopy(model)
    skip_mlps_(skipped, SkipPlan(skip=plan.skip), fold_gates=False)
    skipped_metric = _metric(skipped, batches, task)
    print(f"policy {policy.policy}: skip {plan.skip}: {dense_metric:.2f} -> {skipped_metric:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = save_skipped(model, Path(tmp) / "dense", SkipPlan(skip=[], blocks=plan.blocks), tokenizer)
        skip_dir = save_skipped(skipped, Path(tmp) / "skipped", plan, tokenizer)
        disk = {
            name: (d / "weights.safetensors").stat().st_size
            for name, d in (("dense", dense_dir), ("skipped", skip_dir))
        }
        del model, skipped
        gc.collect()
        dense, _ = load_skipped(dense_dir)
        small, _ = load_skipped(skip_dir)
        latency = {}
        for batch, repeats in ((1, args.repeats * 3), (32, args.repeats)):
            inputs = _fixed_inputs(tokenizer, cfg, batch, args.seq)
            runs = {"dense": lambda x=inputs: dense(**x), "skipped": lambda x=inputs: small(**x)}
            stats = compare_latency(runs, repeats=repeats, warmup=3)
            latency[f"batch{batch}_seq{args.seq}"] = {k: v.to_dict() for k, v in stats.items()}
            change = pct(stats["skipped"].median_ms, stats["dense"].median_ms)
            print(
                f"latency b={batch} T={args.seq}: dense {stats['dense'].median_ms:.2f} ms, skipped "
                f"{stats['skipped'].median_ms:.2f} ms ({change:+.1f}%)",
                flush=True,
            )
        params = {"dense": param_bytes(dense), "skipped": param_bytes(small)}
        memory = {"dense": [], "skipped": []}
        for _ in range(args.memory_repeats):  # alternate fresh processes
            for name, d in (("dense", dense_dir), ("skipped", skip_dir)):
                memory[name].append(
                    _child_memory(str(d), 32, args.seq, args.threads, str(d), cfg.task,
                                  None if cfg.data_dir is None else str(cfg.data_dir))
                )
    peak = {k: min(r["peak_rss"] for r in v) for k, v in memory.items()}
    load_delta = {k: min(r["rss_after_load"] - r["rss_before_load"] for r in v) for k, v in memory.items()}

    main_key = f"batch32_seq{args.seq}"
    lat_change = pct(latency[main_key]["skipped"]["median_ms"], latency[main_key]["dense"]["median_ms"])
    headline = {
        "policy": policy.__dict__ | {"stacks": list(policy.stacks)},
        "blocks": plan.blocks,
        "skipped": plan.skip,
        "n_skipped": len(plan.skip),
        "scores": plan.scores,
        "metric": task.metrics[0],
        "metric_dense": dense_metric,
        "metric_skipped": skipped_metric,
        "metric_delta": skipped_metric - dense_metric,
        "latency": latency,
        "main_latency_key": main_key,
        "latency_change_pct": {
            k: pct(v["skipped"]["median_ms"], v["dense"]["median_ms"]) for k, v in latency.items()
        },
        "param_bytes": params,
        "param_bytes_change_pct": pct(params["skipped"], params["dense"]),
        "weights_file_bytes": disk,
        "peak_rss_bytes": peak,
        "rss_load_delta_bytes": load_delta,
        "peak_rss_change_pct": pct(peak["skipped"], peak["dense"]),
    }
    acceptance = {
        "metric_loss_le_1pt": skipped_metric - dense_metric >= -1.0,
        "skipped_ge_2_of_6": len(plan.skip) >= 2,
        "cpu_latency_le_minus_15pct": lat_change <= -15.0,
        "param_bytes_le_minus_8pct": headline["param_bytes_change_pct"] <= -8.0,
    }
    run_result = json.loads((Path(args.run_dir) / "results.json").read_text())
    out = {
        "what": "ADA-DEFT on MiniLM / SST-2: DEFT (LoRA, alpha>0) trained with learned MLP-block gates; "
        "blocks removed at inference; dense = the same run with no block removed (gates folded)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": describe("cpu") | {"torch_threads": torch.get_num_threads()},  # CPU by design
        "run_dir": args.run_dir,
        "train": {
            "deftune": json.loads((Path(args.run_dir) / "deftune.json").read_text())["train"],
            "metric": run_result["metric"],
            "density": run_result["density"]["exact"],
            "train_seconds": run_result["train_seconds"],
        },
        "gates": gates,
        "density_per_block": density,
        "density_threshold": args.density_threshold,
        "pareto": pareto,
        "headline": headline,
        "acceptance": acceptance,
        "seconds": time.perf_counter() - t0,
    }
    if args.reference_run:
        ref = json.loads((Path(args.reference_run) / "results.json").read_text())
        out["reference_deft_run"] = {
            "run_dir": args.reference_run,
            "metric": ref["metric"],
            "density": ref["density"]["exact"],
            "train_seconds": ref["train_seconds"],
        }
        print("reference run (plain DEFT, no gates):", flush=True)
        ref_model, _, _, _ = prepare_run(args.reference_run)
        ref_density = density_scores(ref_model, no_labels, args.density_threshold)
        out["reference_deft_run"]["density_per_block"] = ref_density
        out["reference_deft_run"]["pareto_density"] = _pareto(
            ref_model, ref_density, "density", batches, task
        )
        del ref_model
    for item in args.embed:
        key, _, path = item.partition("=")
        out[key] = json.loads(Path(path).read_text())
    if args.note:
        out["notes"] = list(args.note)
    write_json_atomic(args.json, out)
    print(
        json.dumps(
            {
                "headline": {
                    k: headline[k]
                    for k in (
                        "skipped",
                        "metric_delta",
                        "latency_change_pct",
                        "param_bytes_change_pct",
                        "peak_rss_change_pct",
                    )
                },
                "acceptance": acceptance,
            },
            indent=2,
        )
    )
    if args.plot:
        plot_pareto(out, args.plot)
    if args.gates_plot:
        plot_gates(Path(args.run_dir) / "train_log.jsonl", args.gates_plot)


def plot_pareto(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {"gate": "ranked by learned gate", "density": "ranked by density (training-free)"}
    for name, rows in result["pareto"].items():
        ax.plot([r["skipped"] for r in rows], [r["metric"] for r in rows], marker="o", label=labels[name])
    ref = result.get("reference_deft_run")
    if ref and "pareto_density" in ref:
        rows = ref["pareto_density"]
        ax.plot(
            [r["skipped"] for r in rows],
            [r["metric"] for r in rows],
            marker="s",
            ls=":",
            color="black",
            label="plain DEFT (no gates), density-ranked",
        )
    h = result["headline"]
    ax.axhline(h["metric_dense"] - 1.0, color="grey", lw=0.8, ls="--", label="ADA model unskipped - 1 point")
    ax.scatter(
        [h["n_skipped"]],
        [h["metric_skipped"]],
        s=120,
        facecolors="none",
        edgecolors="red",
        label=f"policy {h['policy']['policy']}: {h['latency_change_pct'][h.get('main_latency_key', 'batch32_seq64')]:+.0f}% latency",
    )
    ax.set_xlabel(f"MLP blocks removed (of {len(h['blocks'])})")
    ax.set_ylabel(f"SST-2 dev {h['metric']} (%)")
    ax.set_title("MiniLM on SST-2: dev accuracy vs MLP blocks removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gates(log_path: Path, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = [k for k in rows[0] if k.startswith("ada/gate/")]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k in keys:
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k.removeprefix("ada/gate/"))
    ax.set_xlabel("training step")
    ax.set_ylabel("inference gate g_l")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("ADA-DEFT gates during training (MiniLM, SST-2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- llama (GPU) -------------------------------------------------------------------------------

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
LLAMA_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _decode_times(model, prompt, steps: int, device, warmup: int) -> list[float]:
    """Wall time (ms) of ``steps`` greedy decode steps after a prefill of ``prompt`` (KV cache)."""
    from deftune.ada.measure import _sync

    times = []
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return times


def cmd_llama(args: argparse.Namespace) -> None:
    """Dense and skipped models resident together; every timing interleaved (A/B, then B/A)."""
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM

    from deftune.ada import SkipConfig, SkipPlan, density_scores, param_bytes, plan_skip, skip_mlps_
    from deftune.ada.measure import compare_latency, peak_memory
    from deftune.hardware import describe

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = LLAMA_8B if args.llama_8b_shape else LLAMA_TINY
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            dense = LlamaForCausalLM(config).eval()  # random N(0, 0.02) weights
    finally:
        torch.set_default_dtype(old)
    build_s = time.perf_counter() - t0
    n_layers = shape["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=g).to(device)
    inputs = {"input_ids": prefill, "logits_to_keep": 1}
    density = density_scores(dense, [{"input_ids": prefill[:1]}], threshold=args.density_threshold)
    k = round(args.skip_fraction * n_layers)
    plan = plan_skip(
        dense,
        SkipConfig(
            policy="topk", keep=n_layers - k, score="density", density_threshold=args.density_threshold
        ),
        density=density,
    )

    # peak memory: the CUDA allocator's peak with each model alone; on the CPU the process's peak RSS
    # only grows (the dense model was loaded first), so no per-model figure exists there: None
    peak = {"dense": peak_memory(dense, inputs) if device.type == "cuda" else None}
    small = copy.deepcopy(dense)
    skip_mlps_(small, SkipPlan(skip=plan.skip), fold_gates=False)
    models = {"dense": dense, "skipped": small}
    params = {name: param_bytes(m) for name, m in models.items()}
    prefill_stats = compare_latency(
        {n: (lambda m=m: m(**inputs)) for n, m in models.items()},
        repeats=args.repeats,
        warmup=3,
        device=device,
    )
    decode: dict[str, list[float]] = {n: [] for n in models}
    for m in models.values():  # warm the allocator and kernels for both before timing
        _decode_times(m, prefill[:1], 4, device, warmup=4)
    for r in range(args.decode_rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            decode[name] += _decode_times(models[name], prefill[:1], args.decode_steps, device, warmup=2)
    del dense, models
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak["skipped"] = peak_memory(small, inputs) if device.type == "cuda" else None  # the skipped model alone

    def block(name: str) -> dict:
        return {
            "param_bytes": params[name],
            "peak_memory_bytes": peak[name],
            "prefill_ms": prefill_stats[name].to_dict(),
            "decode_step_ms": {"median_ms": statistics.median(decode[name]), "steps": len(decode[name])},
        }

    result = {"dense": block("dense"), "skipped_model": block("skipped")}
    d, s = result["dense"], result["skipped_model"]
    out = {
        "what": "LLaMA-architecture model with RANDOM weights (8B shape)"
        if args.llama_8b_shape
        else "tiny LLaMA-architecture model with RANDOM weights (smoke test)",
        "label": "speed and memory only: random weights, no task metric",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": describe(str(device)),
        "config": shape,
        "dtype": args.dtype,
        "build_seconds": build_s,
        "prefill_shape": [args.batch, args.seq],
        "decode": {
            "batch": 1,
            "prompt": args.seq,
            "steps_per_round": args.decode_steps,
            "rounds": args.decode_rounds,
        },
        "method": "dense and skipped resident together; prefill timed round-robin, decode in alternating-order "
        "rounds; peak memory (torch.cuda.max_memory_allocated of one prefill) with each model alone; "
        "None on the CPU, where the process's peak RSS cannot separate the two models",
        "skipped": plan.skip,
        "n_skipped": len(plan.skip),
        "n_blocks": n_layers,
        "policy": f"topk by thresholded density |a|>{args.density_threshold} (training-free), keep {n_layers - k}",
        **result,
        "change_pct": {
            "param_bytes": pct(s["param_bytes"], d["param_bytes"]),
            "peak_memory": pct(s["peak_memory_bytes"], d["peak_memory_bytes"]) if device.type == "cuda" else None,
            "prefill_latency": pct(s["prefill_ms"]["median_ms"], d["prefill_ms"]["median_ms"]),
            "decode_latency": pct(s["decode_step_ms"]["median_ms"], d["decode_step_ms"]["median_ms"]),
        },
    }
    write_json_atomic(args.json, out)
    print(json.dumps({"dense": d, "skipped": s, "change_pct": out["change_pct"]}, indent=2))


# ---- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="DEFT + ADA gates on MiniLM (a run directory)")
    p.add_argument("--output-dir", required=True, help="run directory to write")
    p.add_argument("--task", default="sst2", help="GLUE task")
    p.add_argument("--data-dir", default="../shared/data/glue", help="GLUE folder")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--alpha", type=float, default=1.0, help="DEFT density-loss weight")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--gate", default="hard_concrete", help="gate parameterisation")
    p.add_argument("--penalty", type=float, default=0.1, help="gate penalty lambda")
    p.add_argument("--penalty-warmup-steps", type=int, default=0, help="lambda warm-up")
    p.add_argument("--logit-scale", type=float, default=50.0, help="gate logit scale")
    p.add_argument("--init", type=float, default=0.9, help="initial gate value")
    p.add_argument("--density-weighting", default="gate", help="gate | gate_grad | uniform")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-gates", action="store_true", help="plain DEFT (no ADA extension): the reference run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("minilm", help="Pareto + dense vs skipped on a trained run (CPU)")
    p.add_argument("--run-dir", required=True, help="trained run directory")
    p.add_argument("--policy", default="gate", help="gate | density | topk")
    p.add_argument("--tau", type=float, default=0.5, help="gate threshold")
    p.add_argument("--keep", type=int, default=4, help="topk: blocks kept")
    p.add_argument("--score", default="gate", help="topk: gate | density")
    p.add_argument("--tau-density", type=float, default=0.1, help="density threshold")
    p.add_argument("--density-threshold", type=float, default=None, help="|a| > tau density (None: exact)")
    p.add_argument("--density-examples", type=int, default=256, help="train examples for density")
    p.add_argument("--seq", type=int, default=64, help="timed sequence length")
    p.add_argument(
        "--repeats", type=int, default=30, help="timed repeats per model (batch 32; x3 for batch 1)"
    )
    p.add_argument("--memory-repeats", type=int, default=2, help="fresh processes per model for peak RSS")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default="docs/results/ada.json", help="results JSON")
    p.add_argument("--plot", default="docs/img/ada_pareto.png", help="Pareto plot (empty: none)")
    p.add_argument(
        "--gates-plot", default="docs/img/ada_gates.png", help="gate trajectory plot (empty: none)"
    )
    p.add_argument("--reference-run", default=None, help="plain DEFT run (no gates) to report beside")
    p.add_argument("--embed", action="append", default=[], help="KEY=PATH: embed another results JSON")
    p.add_argument("--note", action="append", default=[], help="a note stored with the results")
    p.set_defaults(fn=cmd_minilm)

    p = sub.add_parser("_child", help=argparse.SUPPRESS)
    for name in ("--model-dir", "--tokenizer-dir", "--task"):
        p.add_argument(name, required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(fn=cmd_child)

    p = sub.add_parser("llama", help="random-weight LLaMA: speed and memory, dense vs skipped")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--llama-8b-shape", action="store_true", help="8B shape (else a tiny smoke-test shape)")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype")
    p.add_argument("--batch", type=int, default=4, help="prefill batch")
    p.add_argument("--seq", type=int, default=512, help="prefill length (and decode prompt length)")
    p.add_argument("--skip-fraction", type=float, default=0.25, help="fraction of MLP blocks to remove")
    p.add_argument("--density-threshold", type=float, default=0.01, help="|a| > tau for the density score")
    p.add_argument("--repeats", type=int, default=20, help="timed prefill repeats")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per round")
    p.add_argument("--decode-rounds", type=int, default=4, help="decode rounds, alternating model order")
    p.add_argument("--json", default="ada_llama.json", help="results JSON")
    p.set_defaults(fn=cmd_llama)

    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
