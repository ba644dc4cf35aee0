"""The code's layout: lm/ is the library, a stage imports lm/ and the stage framework only, every stage has one
contract, and dvc.yaml's code deps are exactly what each stage imports, so an edit reruns the stages it affects."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages import NO_TELEMETRY, registry
from stages.dvcfile import stage_names

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK = {"stages.cli", "stages.config", "stages.cost", "stages.dvcfile", "stages.tracking"}
STAGES = stage_names(ROOT)


def module_file(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def project_imports(module: str) -> set[str]:
    """The lm and stages modules `module` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("lm", "stages") and module_file(n).exists()}
    return found


def code_closure(module: str) -> set[str]:
    """module and what it imports from the project, transitively, without the stage framework."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen and current not in FRAMEWORK:
            seen.add(current)
            todo += project_imports(current)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    imported = project_imports(f"stages.{stage}")
    assert not {m for m in imported if m.startswith("stages.") and m not in FRAMEWORK}, imported


def test_the_library_imports_no_stage():
    for path in sorted((ROOT / "lm").glob("*.py")):
        module = f"lm.{path.stem}"
        assert not {m for m in project_imports(module) if m.startswith("stages")}, module


def test_the_framework_imports_no_stage():
    for module in FRAMEWORK:
        assert all(m in FRAMEWORK or m.startswith("lm.") for m in project_imports(module)), module


def test_every_stage_has_the_one_contract():
    runs = registry(ROOT)
    assert list(runs) == STAGES
    for name, run in runs.items():
        assert list(inspect.signature(run).parameters) == ["params", "tracker"], name
        source = module_file(f"stages.{name}").read_text()
        assert source.rstrip().endswith('if __name__ == "__main__":\n    cli.main(run)'), name


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_in_dvc_yaml_are_exactly_what_the_stage_imports(stage):
    import yaml

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    listed = {dep for dep in spec["deps"] if dep.endswith(".py")}
    imported = {str(module_file(m).relative_to(ROOT)) for m in code_closure(f"stages.{stage}")}
    assert listed == imported, f"dvc.yaml {stage}: missing {imported - listed}, not imported {listed - imported}"


def test_scratch_does_not_depend_on_pretrain_or_distillation_code():
    closure = code_closure("stages.scratch")
    assert not {"stages.pretrain", "stages.distill", "lm.distill"} & closure


def test_flows_and_stages_started_without_make_keep_telemetry_off():
    env = {k: v for k, v in os.environ.items() if k not in NO_TELEMETRY}
    probe = "import flows, os; from prefect.settings import get_current_settings as s;"
    probe += "print(s().server.analytics_enabled, os.environ['MLFLOW_DISABLE_TELEMETRY'], os.environ['DO_NOT_TRACK'])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "true", "1"]
