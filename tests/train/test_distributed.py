"""A 2-process CPU (gloo) data-parallel run through torchrun: density is reduced over both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
def test_two_process_gloo_run_reduces_density(tmp_path, tiny_setup):
    model_dir, data_dir = tiny_setup
    out = tmp_path / "run"
    # CPU processes (gloo) even on a GPU machine: two ranks on one GPU would be an invalid NCCL setup
    env = dict(os.environ, OMP_NUM_THREADS="1", DEFTUNE_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "deftune", "train", "--model", str(model_dir), "--data-dir", str(data_dir),
        "--steps", "3", "--batch-size", "4", "--log-every", "1", "--alpha", "1", "--lr-warmup-steps", "0",
        "--output-dir", str(out), "--method", "lora",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and all(r["world_size"] == 2 for r in log)

    # what each process saw at each step: the loop's own data plan, recomputed here
    from transformers import AutoTokenizer

    from deftune.data.glue import load_glue, make_batches
    from deftune.train.loop import _step_batches

    tok = AutoTokenizer.from_pretrained(model_dir)
    batches = make_batches(load_glue("sst2", "train", data_dir), tok, batch_size=4, max_length=64, shuffle=True)
    plans = [_step_batches(batches, 3, r, 2, 0) for r in (0, 1)]
    layers, features = 2, 37
    for record in log:
        s = record["step"]
        real = sum(int(plans[r][s]["attention_mask"].sum()) for r in (0, 1))
        assert record["density_elements"] == real * layers * features  # summed over both processes
        assert 0 < record["exact_density"] <= 1
    assert (out / "results.json").is_file() and (out / "deftune.json").is_file()
