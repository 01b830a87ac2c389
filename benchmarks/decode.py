"""End-to-end greedy decoding, tokens/s: a LLaMA-3-8B-shaped model, dense vs sparse MLPs.

The model is ``transformers``' ``LlamaForCausalLM`` at 8B shape (hidden 4096, intermediate
14336, 32 heads, 8 KV heads, vocab 128256) with RANDOM weights: it measures speed only, its text
is meaningless. bf16. Each variant decodes the same prompt with a static KV cache; one decoding
step (all layers, the LM head and the argmax feeding the next step) is captured in one CUDA graph,
for the dense model and the sparse ones alike, all in one run.

Two ways to run the non-MLP part of a step (``--paths``), each timed with the dense and the sparse
MLPs in the same run:

* ``eager``: the model's own modules (embeddings, RMSNorms, q/k/v/o projections, rotary embedding)
  called one by one, about 35 small kernels per layer;
* ``compiled``: the same arithmetic written as two functions per layer (RMSNorm + one fused QKV
  projection + rotary; attention over the cache + o-projection + residual + RMSNorm) and compiled
  by ``torch.compile`` (Inductor fuses the element-wise work), then captured in the CUDA graph like
  the eager path. The dense baseline gets a compiled MLP too (one fused gate+up GEMV, SiLU x up
  fused), so both sides of the ratio have the leanest step this script can build.

``layer.mlp`` is the original ``LlamaMLP`` or the :class:`deftune.sparse.SparseGatedMLP` installed by
:func:`deftune.sparse.sparsify_mlps_`; only the attention over the static cache is written here. The
step's logits are checked against the model's own forward.

MLP density is imposed by per-layer thresholds: ``t_l`` = the ``(1 - d)`` quantile of
``|silu(gate)|`` of layer ``l`` on a calibration prompt; the density actually reached on the
decoded tokens is measured and reported.

    PYTHONPATH=src python3 benchmarks/decode.py --out docs/results/decode_h100.json

Speedups are against the faster dense variant of the same path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from deftune.arch import find_activation_sites
from deftune.runs import write_json_atomic as write_json
from deftune.sparse import restore_mlps_, sparse_modules, sparsify_mlps_, use_triton
from deftune.sparse.triton_mlp import default_config, load_tuned_configs


def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One query position over the static cache, grouped-query: ``q`` (B, nh, 1, hd), ``kc``/``vc``
    (B, nkv, T, hd), ``visible`` (T,) bool -> (B, 1, nh*hd). Softmax in fp32."""
    B, nh, _, hd = q.shape
    nkv = kc.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd)  # query heads grouped by their KV head
    s = (qg @ kc.transpose(-1, -2)).float() * hd**-0.5  # (B, nkv, g, T)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).to(qg.dtype)
    return (p @ vc).reshape(B, 1, nh * hd)


class StaticDecoder:
    """One greedy decoding step over a static KV cache, written to be captured in a CUDA graph.

    State on the device: ``tok`` (B,) the current token, ``pos`` (1,) its position; a step writes
    the argmax into ``tok``, the logits into ``logits`` and advances ``pos``. ``compiled`` selects the
    ``torch.compile`` non-MLP path; ``use_compiled_dense_mlp`` then makes the MLPs the compiled dense
    one (for the dense baseline) instead of ``layer.mlp``.
    """

    use_compiled_dense_mlp = False

    def __init__(self, model: LlamaForCausalLM, max_len: int, batch: int = 1, compiled: bool = False) -> None:
        cfg = model.config
        self.model, self.inner = model, model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        dev, dt = model.device, model.dtype
        n_layers = cfg.num_hidden_layers
        self.k_cache = torch.zeros(
            n_layers, batch, self.kv_heads, max_len, self.head_dim, device=dev, dtype=dt
        )
        self.v_cache = torch.zeros_like(self.k_cache)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(batch, cfg.vocab_size, device=dev, dtype=torch.float32)
        positions = torch.arange(max_len, device=dev)[None]
        self.cos, self.sin = self.inner.rotary_emb(self.k_cache, positions)  # (1, T, hd) each
        self.slots = torch.arange(max_len, device=dev)
        self.batch = batch
        self.compiled = compiled
        if compiled:
            self._build_compiled()

    def _build_compiled(self) -> None:
        """Per-layer weights as plain tensors (QKV concatenated) and the two compiled layer halves."""
        inner, B, hd = self.inner, self.batch, self.head_dim
        nh, nkv = self.heads, self.kv_heads
        eps = inner.norm.variance_epsilon
        self.w = [
            dict(
                ln=layer.input_layernorm.weight,
                qkv=torch.cat(
                    [
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ]
                ),  # (nh*hd + 2*nkv*hd, H)
                o=layer.self_attn.o_proj.weight,
                post=layer.post_attention_layernorm.weight,
            )
            for layer in inner.layers
        ]

        def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm's arithmetic
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

        def pre(h, m, ln, wqkv, cos, sin):  # residual of the previous MLP, norm, QKV, rotary
            h = h if m is None else h + m  # (B, 1, H)
            qkv = F.linear(rms(h, ln), wqkv)
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = q.view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
            k = k.view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
            v = v.view(B, 1, nkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            return h, q, k, v

        def post(h, q, kc, vc, visible, wo, post_w):  # attention over the cache, o-proj, residual, norm
            h = h + F.linear(attend(q, kc, vc, visible), wo)
            return h, rms(h, post_w)

        def head(h, m, norm_w, lm_w):
            logits = F.linear(rms(h + m, norm_w), lm_w)[:, -1].float()  # (B, V)
            return logits, logits.argmax(-1)

        opts = dict(fullgraph=True, dynamic=False)
        self._pre, self._post = torch.compile(pre, **opts), torch.compile(post, **opts)
        self._head = torch.compile(head, **opts)
        inter = inner.layers[0].mlp.gate_proj.weight.shape[0]

        def dense_mlp(x, w_gu, w_d):  # one (2I, H) GEMV, SiLU x up fused, down GEMV
            g, u = F.linear(x, w_gu).split([inter, inter], dim=-1)
            return F.linear(F.silu(g) * u, w_d)

        self._compiled_mlp = torch.compile(dense_mlp, **opts)
        self._dense_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # built on first use

    def _dense_mlp_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (concatenated gate+up, down) weights of the compiled dense baseline; the
        concatenated copies (one per layer) exist only once that baseline has run."""
        if self._dense_weights is None:
            self._dense_weights = [
                (
                    torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                    layer.mlp.down_proj.weight,
                )
                for layer in self.inner.layers
            ]
        return self._dense_weights[i]

    def step(self) -> None:
        if self.compiled:
            self._step_compiled()
        else:
            self._step_eager()

    def _step_compiled(self) -> None:
        cos = self.cos.index_select(1, self.pos)  # (1, 1, hd)
        sin = self.sin.index_select(1, self.pos)
        visible = self.slots <= self.pos  # (T,)
        h = self.inner.embed_tokens(self.tok)[:, None, :]  # (B, 1, H)
        m = None
        for i, layer in enumerate(self.inner.layers):
            w = self.w[i]
            h, q, k, v = self._pre(h, m, w["ln"], w["qkv"], cos, sin)
            self.k_cache[i].index_copy_(2, self.pos, k)
            self.v_cache[i].index_copy_(2, self.pos, v)
            h, x = self._post(h, q, self.k_cache[i], self.v_cache[i], visible, w["o"], w["post"])
            m = (
                self._compiled_mlp(x, *self._dense_mlp_weights(i))
                if self.use_compiled_dense_mlp
                else layer.mlp(x)
            )
        logits, tok = self._head(h, m, self.inner.norm.weight, self.model.lm_head.weight)
        self.logits.copy_(logits)
        self.tok.copy_(tok)
        self.pos.add_(1)

    def _step_eager(self) -> None:
        B, hd, nkv = self.batch, self.head_dim, self.kv_heads
        cos = self.cos.index_select(1, self.pos)  # (1, 1, hd)
        sin = self.sin.index_select(1, self.pos)
        visible = self.slots <= self.pos  # (T,)
        h = self.inner.embed_tokens(self.tok)[:, None, :]  # (B, 1, H)
        for i, layer in enumerate(self.inner.layers):
            at = layer.self_attn
            x = layer.input_layernorm(h)
            q = at.q_proj(x).view(B, 1, self.heads, hd).transpose(1, 2)  # (B, nh, 1, hd)
            k = at.k_proj(x).view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
            v = at.v_proj(x).view(B, 1, nkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k_cache[i].index_copy_(2, self.pos, k)
            self.v_cache[i].index_copy_(2, self.pos, v)
            h = h + at.o_proj(attend(q, self.k_cache[i], self.v_cache[i], visible))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(self.inner.norm(h))[:, -1].float()  # (B, V)
        self.logits.copy_(logits)
        self.tok.copy_(logits.argmax(-1))
        self.pos.add_(1)


def capture(dec: StaticDecoder) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            dec.pos.zero_()
            dec.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.step()
    return graph


def decode(dec: StaticDecoder, graph: torch.cuda.CUDAGraph, prompt: torch.Tensor, new_tokens: int):
    """Feed ``prompt`` (1-D) token by token, then generate; returns (tokens, seconds of generation, last-prompt logits)."""
    dec.pos.zero_()
    for t in prompt.tolist():
        dec.tok.fill_(t)
        graph.replay()
    prompt_logits = dec.logits.clone()
    generated = []
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(new_tokens):
        graph.replay()
        generated.append(dec.tok.clone())  # device-side copy, no sync
    end.record()
    end.synchronize()
    return torch.stack(generated, 1), start.elapsed_time(end) / 1000, prompt_logits


def calibrate(
    model: LlamaForCausalLM, sites, ids: torch.Tensor, densities: list[float]
) -> dict[float, dict[str, float]]:
    """Per-layer thresholds reaching each density on ``ids``: quantiles of |act(gate)|."""
    mags: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(s.module_path).register_forward_hook(
            lambda m, i, o, name=s.name: mags.__setitem__(name, o.detach().abs().float().flatten())
        )
        for s in sites
    ]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for d in densities:
        out[d] = {}
        for name, v in mags.items():
            k = min(v.numel(), max(1, int(round((1 - d) * v.numel()))))
            out[d][name] = 0.0 if d >= 1.0 else float(v.kthvalue(k).values)
    return out


def measured_density(
    model: LlamaForCausalLM, sites, ids: torch.Tensor, thresholds: dict[str, float]
) -> float:
    """Fraction of |silu(gate x)| > t_l over the tokens ``ids`` and all layers, on the model as wrapped."""
    fracs = []
    handles = []
    for site in sites:  # found before wrapping: the wrapper sits at the same mlp_path
        mlp = model.get_submodule(site.mlp_path)
        base = getattr(mlp, "base", mlp)
        t = thresholds[site.name]
        handles.append(
            mlp.register_forward_pre_hook(
                lambda m, args, base=base, t=t: fracs.append(
                    float((F.silu(base.gate_proj(args[0])).abs() > t).float().mean())
                )
            )
        )
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return sum(fracs) / len(fracs)


def bytes_per_token(cfg: LlamaConfig, mlp_density: float) -> float:
    """Weight bytes one decoding step reads (bf16): attention, LM head, and the MLP at ``mlp_density``."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    attn = h * h * 2 + h * kv * 2
    mlp = h * i * (1 + 2 * mlp_density)
    return 2 * (layers * (attn + mlp) + cfg.vocab_size * h)


def plot(payload: dict, path: str) -> None:
    """Bar chart of tokens/s per variant and step path, with the bytes-read ideal of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = payload["results"]
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    names, colors, ideals = [], [], []
    for r in res:
        step = r.get("path", "eager")
        names.append(
            f"{step}\n"
            + r["variant"]
            .replace(" (cuBLAS LlamaMLP)", "\n(cuBLAS)")
            .replace(" (compiled MLP)", "\n(compiled)")
        )
        colors.append(
            "grey" if r["density_target"] is None else ("tab:blue" if step == "eager" else "tab:orange")
        )
        ideals.append(r["tokens_per_s"] / r["speedup"] * r["ideal_speedup"])  # the path's dense x ideal
    ax.bar(range(len(res)), [r["tokens_per_s"] for r in res], color=colors)
    ax.scatter(range(len(res)), ideals, marker="_", s=500, color="k", label="bytes-read ideal", zorder=3)
    for k, r in enumerate(res):
        ax.text(k, r["tokens_per_s"] + 2, f"x{r['speedup']:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(res)), names, fontsize=6)
    m = payload["model"]
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title(
        f"LLaMA-3-8B shape ({m['layers']} layers, random weights), bf16, "
        f"{payload['hardware']['gpu'].replace('NVIDIA ', '')}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


@torch.no_grad()
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    p.add_argument(
        "--paths",
        default="eager,compiled",
        help="non-MLP step implementations to time: 'eager' (the model's modules) and/or 'compiled' "
        "(torch.compile'd layer halves, fused QKV)",
    )
    p.add_argument("--out", default="docs/results/decode_h100.json")
    p.add_argument(
        "--kernel-configs", default=None, help="tuned kernel configurations (sparse_mlp.py --tune)"
    )
    p.add_argument("--plot", default=None, help="PNG path for the tokens/s figure")
    p.add_argument("--plot-only", default=None, help="read this results JSON and only plot")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as f:
            plot(json.load(f), args.plot or "docs/decode_h100.png")
        return 0
    densities = [float(v) for v in args.densities.split(",")]
    paths = [v.strip() for v in args.paths.split(",")]
    if not paths or any(v not in ("eager", "compiled") for v in paths):
        p.error(f"--paths {args.paths!r}: a comma-separated list of 'eager' and 'compiled'")
    if args.kernel_configs:
        print(f"loaded {load_tuned_configs(args.kernel_configs)} tuned kernel configurations", flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    for module in model.modules():  # explicit random init: N(0, 0.02) matrices, unit norms
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
        elif hasattr(module, "variance_epsilon"):
            module.weight.fill_(1.0)
    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_properties(0)
    hw = {
        "gpu": gpu.name,
        "sms": gpu.multi_processor_count,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cuda": torch.version.cuda,
    }
    print(
        f"hardware: {hw}; model built in {time.time() - t0:.1f}s, {n_params / 1e9:.2f}B params, "
        f"{args.layers} layers, RANDOM weights",
        flush=True,
    )

    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), device="cuda")
    calib = torch.randint(0, cfg.vocab_size, (1, 64), device="cuda")
    sites = find_activation_sites(model)
    thresholds = calibrate(model, sites, calib, [d for d in densities if d < 1.0])
    results = []
    for path in paths:
        dec = StaticDecoder(model, max_len=args.prompt + args.new_tokens + 8, compiled=path == "compiled")
        variants = [("dense (cuBLAS LlamaMLP)", None, False)]
        if path == "compiled":
            variants.append(("dense (compiled MLP)", None, True))
        variants += [(f"sparse d={d}", d, False) for d in densities]
        for name, d, compiled_dense in variants:
            restore_mlps_(model)
            dec.use_compiled_dense_mlp = compiled_dense
            if d is not None:
                t_map = thresholds[d] if d < 1.0 else 0.0
                # auto: Triton for <= 16 rows, the reference backend for the checks below
                sparsify_mlps_(model, t_map)
                probe = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
                assert all(
                    use_triton(probe, m.config, m.base.gate_proj.weight)
                    for m in sparse_modules(model).values()
                )
            t_cap = time.time()
            graph = capture(dec)
            t_cap = time.time() - t_cap
            runs = [decode(dec, graph, prompt, args.new_tokens) for _ in range(args.repeats)]
            secs = [r[1] for r in runs]
            tokens, _, step_logits = runs[0]
            # the graph's step against the model's own forward on the prompt (reference backend for >16 rows)
            ref_logits = model(input_ids=prompt[None]).logits[0, -1].float()
            rel = float((step_logits[0] - ref_logits).norm() / ref_logits.norm())
            same_top1 = bool(step_logits[0].argmax() == ref_logits.argmax())
            seq = torch.cat([prompt[None], tokens], 1)
            t_map_full = thresholds.get(d, {}) if d is not None and d < 1.0 else None
            dens = measured_density(model, sites, seq, t_map_full) if t_map_full else 1.0
            tps = args.new_tokens / statistics.median(secs)
            ideal = bytes_per_token(cfg, 1.0) / bytes_per_token(cfg, dens)
            results.append(
                dict(
                    path=path,
                    variant=name,
                    density_target=d,
                    density_measured=dens,
                    tokens_per_s=tps,
                    ideal_speedup=ideal,
                    seconds=secs,
                    capture_seconds=t_cap,
                    step_vs_forward_rel_err=rel,
                    step_vs_forward_same_top1=same_top1,
                    first_tokens=tokens[0, :8].tolist(),
                )
            )
            print(
                f"{path:8s} {name:26s} {tps:8.1f} tok/s  (median of {args.repeats} x {args.new_tokens} tokens; "
                f"density {dens:.3f}; step vs forward rel err {rel:.1e}, same top-1 {same_top1}; "
                f"capture {t_cap:.1f}s)",
                flush=True,
            )
            del graph
            torch.cuda.empty_cache()
        del dec
        restore_mlps_(model)
        torch.cuda.empty_cache()
    targets = {}
    for path in paths:
        rows = [r for r in results if r["path"] == path]
        dense = max(r["tokens_per_s"] for r in rows if r["density_target"] is None)  # the faster dense
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / dense
        at01 = [r for r in rows if r["density_target"] == 0.1]
        if at01:
            targets[path] = dict(
                density=0.1, speedup=at01[0]["speedup"], target=1.5, met=at01[0]["speedup"] >= 1.5
            )
    print(f"\n{'path':8s} {'variant':26s} {'density':>8s} {'tok/s':>8s} {'speedup':>8s} {'ideal':>8s}")
    for r in results:
        print(
            f"{r['path']:8s} {r['variant']:26s} {r['density_measured']:8.3f} {r['tokens_per_s']:8.1f} "
            f"{r['speedup']:8.2f} {r['ideal_speedup']:8.2f}"
        )
    for path, t in targets.items():
        print(f"target d=0.1 ({path}): x{t['speedup']:.2f} vs 1.5 -> {'MET' if t['met'] else 'MISSED'}")
    write_json(
        args.out,
        {
            "hardware": hw,
            "command": "PYTHONPATH=src python3 benchmarks/decode.py " + " ".join(argv),
            "model": dict(
                layers=args.layers,
                hidden=4096,
                intermediate=14336,
                heads=32,
                kv_heads=8,
                vocab=128256,
                params=n_params,
                weights="random (speed only)",
                dtype="bfloat16",
            ),
            "prompt_tokens": args.prompt,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "method": "one decoding step per CUDA graph replay, static KV cache, greedy argmax on device; "
            "speedups against the faster dense variant of the same path",
            "kernel_config_batch1": str(default_config(1, cfg.hidden_size, cfg.intermediate_size)),
            "results": results,
            "acceptance": targets,
        },
    )
    if args.plot:
        with open(args.out, encoding="utf-8") as f:
            plot(json.load(f), args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
