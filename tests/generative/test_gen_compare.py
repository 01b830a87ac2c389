"""``deftune compare`` with the generative task ``squad``: rows, resumption, config errors."""

from __future__ import annotations

import json

import pytest

from deftune.compare import CompareConfig, load_rows, run_compare, summarise

TINY = dict(batch_size=2, eval_questions=4, ppl_texts=2, max_new_tokens=3, max_length=96, max_context_tokens=48,
            eval_articles=1, eval_batch_size=4, log_every=1, lr=1e-2, prompt_style="plain", eval_before=False)


def _grid(squad_file, tmp_path, **kw) -> CompareConfig:
    base = dict(tasks=("squad",), methods=("lora",), alphas=(0.0, 1.0), steps=2, generative_model="tiny-llama",
                squad_dir=str(squad_file), generative_options=dict(TINY), runs_dir=str(tmp_path / "runs"),
                results_json=str(tmp_path / "squad.json"), report_md=str(tmp_path / "results.md"))
    return CompareConfig(**{**base, **kw})


def test_squad_grid_writes_generative_rows_and_resumes(squad_file, tmp_path, capsys):
    rows = run_compare(_grid(squad_file, tmp_path), progress=False)
    assert [(r["task"], r["alpha"]) for r in rows] == [("squad", 0.0), ("squad", 1.0)]
    for r in rows:
        assert r["metric"]["name"] == "f1" and 0 <= r["metric"]["value"] <= 100
        assert set(r["metrics"]) >= {"exact_match", "f1", "perplexity", "density_decode"}
        assert 0 < r["density"] <= 1 and set(r["per_layer_density"]) == {f"decoder.{i}" for i in range(2)}
        assert r["trainable_parameters"] > 0 and r["model"] == "tiny-llama"
    assert (tmp_path / "runs" / "squad-lora-a1" / "results.json").is_file()
    report = (tmp_path / "results.md").read_text()
    assert report.startswith("# SQuAD (generative QA): PEFT vs DEFT") and "MiniLM" not in report
    assert "| squad | lora | 1 | 1 | f1 |" in report and "SQuAD rows: `tiny-llama`, 2 steps" in report
    assert "--generative-options batch_size=2" in report
    assert set(summarise(rows)) == {1.0}

    # finished runs are skipped; an interrupted one (folder without results.json) restarts cleanly
    (tmp_path / "runs" / "squad-lora-a2").mkdir()
    (tmp_path / "runs" / "squad-lora-a2" / "junk").write_text("partial")
    capsys.readouterr()
    run_compare(_grid(squad_file, tmp_path, alphas=(0.0, 1.0, 2.0)), progress=False)
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2 and "squad-lora-a2: training" in out
    assert not (tmp_path / "runs" / "squad-lora-a2" / "junk").exists()
    assert len(load_rows(tmp_path / "squad.json")) == 3
    assert json.loads((tmp_path / "squad.json").read_text())["runs"][2]["alpha"] == 2.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(methods=("lora", "adapter")), r"methods \['adapter'\] have no generative \(squad\) version"),
        (dict(generative_options={"steps": 5}), r"generative_options cannot set \['steps'\]"),
        (dict(generative_options={"batch_sise": 2}), "unknown GenConfig field"),
        (dict(generative_options={"act_threshold_density": 2.0}), "act_threshold_density must be in"),
    ],
)
def test_squad_grid_rejects_bad_settings_before_training(squad_file, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _grid(squad_file, tmp_path, **kw)
