"""The recipe command line run as a user runs it: in a subprocess."""

from __future__ import annotations

import fiddle as fdl
import pytest

from tessera.recipes.llama_pretrain import recipe

from helpers.launch import child_cpu_seconds, run_recipe


def test_help_lists_presets_and_registries():
    result = run_recipe("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "debug" in out and "about a minute on 2 CPU cores" in out
    for kind, name in [("ATTENTION", "gqa"), ("FEED_FORWARD", "swiglu"), ("NORM", "rmsnorm"), ("POSITION", "rope"),
                       ("OPTIMIZER", "adamw"), ("SCHEDULER", "warmup_cosine"), ("PARALLEL_PLAN", "single")]:
        assert any(line.strip().startswith(kind) and name in line for line in out.splitlines()), (kind, out)


def test_print_shows_resolved_tree_with_overrides():
    result = run_recipe("model.layers[*].attention.n_kv_heads=1", "--print")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("n_kv_heads = 1") == 6
    assert "(ATTENTION 'gqa')" in result.stdout


def test_dry_run_reports_parameters_quickly():
    with child_cpu_seconds() as cpu:  # CPU time, not wall time: other work on the machine does not count
        result = run_recipe("--dry-run", fresh=True)  # a fresh interpreter: its imports are what a user pays
    elapsed = cpu[0]
    assert result.returncode == 0, result.stderr
    # independent count: build the preset's model for real (not on meta), here
    model = fdl.build(recipe.config("debug").model)
    assert f"{sum(p.numel() for p in model.parameters()):,}" in result.stdout
    assert "training FLOPs per token" in result.stdout
    assert elapsed < 10, f"--dry-run took {elapsed:.1f} s of CPU"


def test_config_errors_exit_2_without_traceback():
    result = run_recipe("model.layers[*].attention.n_heads=3", "optimizr.lr=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "did you mean 'optimizer'" in result.stderr


def test_dump_then_load_round_trips(tmp_path):
    path = tmp_path / "cfg.json"
    assert run_recipe("steps=11", "--dump", str(path)).returncode == 0
    result = run_recipe("--load", str(path), "--print")
    assert result.returncode == 0, result.stderr
    assert "steps = 11" in result.stdout


@pytest.mark.slow
def test_run_from_command_line_trains():
    # fresh: a training run (with its process group) ends through the interpreter's own finalization
    result = run_recipe("steps=15", "batch_size=4", "seq_len=64", "progress.log_every=5", timeout=180, fresh=True)
    assert result.returncode == 0, result.stderr
    assert "done: loss" in result.stdout and "step    15" in result.stdout


def test_export_hf_with_an_action_that_trains_nothing_is_a_config_error(tmp_path):
    result = run_recipe("--dry-run", "--export-hf", str(tmp_path / "hf"))
    assert result.returncode == 2
    assert "--export-hf" in result.stderr and "drop --print/--dump/--dry-run" in " ".join(result.stderr.split())
    assert not (tmp_path / "hf").exists()


def test_overrides_may_follow_flags(tmp_path):
    recipe.main(["--dump", str(tmp_path / "a.json"), "steps=7", "model.layers[*].attention.n_kv_heads=1"])
    recipe.main(["steps=7", "model.layers[*].attention.n_kv_heads=1", "--dump", str(tmp_path / "b.json")])
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    from tessera.registry import serialize

    loaded = serialize.load(str(tmp_path / "a.json"))
    assert loaded.steps == 7 and loaded.model.layers[0].attention.n_kv_heads == 1


def test_a_preset_that_continues_a_checkpoint_is_refused_without_one(capsys):
    with pytest.raises(SystemExit) as stop:
        recipe.main(["continue_hf", "--dry-run"])
    assert stop.value.code == 2
    assert "--from-hf CHECKPOINT_FOLDER" in capsys.readouterr().err
