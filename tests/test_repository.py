"""Repository contract: CI calls the README's test command (the notebooks are checked and run in test_notebooks.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_quick_start_has_the_two_commands_and_the_makefile_both_targets():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quick_start and "make test" in quick_start
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\ndemo: setup\n" in makefile and "\ntest: setup\n" in makefile


def test_every_config_group_option_composes():
    from medssl.train.config import compose_pretrain_config

    for group in ("data", "model", "method", "trainer", "logging"):
        for option in sorted((ROOT / "medssl" / "configs" / group).glob("*.yaml")):
            compose_pretrain_config([f"{group}={option.stem}"])
    compose_pretrain_config(config_name="demo")


def test_benchmark_scripts_compile():
    for script in (ROOT / "benchmarks").glob("*.py"):
        compile(script.read_text(encoding="utf-8"), str(script), "exec")


def test_finetune_and_evaluate_configs_are_typed_and_complete():
    from medssl.downstream.evaluate import compose_evaluate_config
    from medssl.downstream.finetune import compose_finetune_config

    finetune = compose_finetune_config()
    assert finetune.task == "classification" and finetune.model.pretrained == "none"
    evaluate = compose_evaluate_config()
    assert evaluate.backbones == {"random init": "none"} and evaluate.protocols == ["linear", "knn"]
