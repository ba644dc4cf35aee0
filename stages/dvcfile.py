"""The pipeline as dvc.yaml declares it: each stage's command, dependencies, outputs and params, with `${...}`
resolved from the params as DVC resolves them. dvc.yaml is the one place a stage's inputs and outputs are
written; the tracker, the registry of stages and the tests read them from here."""

import dataclasses
import re
from pathlib import Path

import yaml

DVC_YAML = "dvc.yaml"
_VARIABLE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    """The params.yaml keys DVC reruns the stage on."""
    outs: tuple[str, ...]
    """Everything it writes: outs, metrics and plots."""
    always_changed: bool

    def artifacts(self) -> list[Path]:
        """What a run logs beside its metrics: each output file, and the JSON and Markdown files at the top of each
        output folder (a model's card and config, the tokenizer), never data shards or weights."""
        found = []
        for out in map(Path, self.outs):
            if out.is_file():
                found.append(out)
            elif out.is_dir():
                found += sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".md"))
        return found

    def writes(self, path: str | Path) -> bool:
        """Whether `path` is one of the stage's outputs or inside one."""
        path = Path(path)
        return any(path == Path(out) or Path(out) in path.parents for out in self.outs)


def read_yaml(path: str | Path):
    """dvc.yaml or dvc.lock, by PyYAML's C loader where it has one: every stage reads both, and dvc.lock takes
    the pure-Python loader a quarter of a second."""
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def stage_names(root: str | Path = ".") -> list[str]:
    """dvc.yaml's stages, in the order it lists them."""
    return list(read_yaml(Path(root) / DVC_YAML)["stages"])


def value_at(params: dict, key: str):
    """params.yaml's tree at a dotted key, as dvc.yaml names one (`paths.tokens`, `run.seed`)."""
    value = params
    for part in key.split("."):
        value = value[part]
    return value


def stages(params: dict, root: str | Path = ".") -> dict[str, Stage]:
    """Every stage of root/dvc.yaml, its `${...}` resolved from `params` (params.yaml's tree)."""

    def resolve(text: str) -> str:
        return _VARIABLE.sub(lambda match: str(value_at(params, match[1])), text)

    def paths(items: list) -> tuple[str, ...]:
        # a dvc.yaml entry is a path, or {path: {its options}}
        return tuple(resolve(i if isinstance(i, str) else next(iter(i))) for i in items)

    declared = {}
    for name, spec in read_yaml(Path(root) / DVC_YAML)["stages"].items():
        declared[name] = Stage(
            name=name,
            cmd=spec["cmd"],
            deps=paths(spec.get("deps", [])),
            params=tuple(spec.get("params", [])),
            outs=paths([*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]),
            always_changed=bool(spec.get("always_changed")),
        )
    return declared
