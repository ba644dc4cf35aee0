"""Named sets of params overrides in presets/, run as a DVC experiment: params.yaml itself stays as it is.

python -m flows.presets gpt2-124m        # = dvc exp run -S tokenize.vocab_size=50257 -S ...
python -m flows.presets cpu-tiny --queue # queue it instead (dvc exp run --queue)
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from flows.interpreter import env_with_interpreter
from stages.config import Params, flatten, load_params, merge, parse_params, read_yaml

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise SystemExit(f"no preset {name!r}; presets: {known}")
    return read_yaml(path)


def merged(params_file: Path, overrides: dict) -> Params:
    """params.yaml with the preset applied, checked like any params (unknown keys and bad values fail)."""
    return parse_params(merge(read_yaml(params_file), overrides))


def yaml_scalar(value) -> str:
    """A value as YAML reads it back: bools and numbers as JSON, floats always with a dot (YAML 1.1 reads 6e-05
    as a string, 6.0e-05 as a float), strings as they are."""
    if isinstance(value, str):
        return value
    text = json.dumps(value)
    return text.replace("e", ".0e") if isinstance(value, float) and "e" in text and "." not in text else text


def set_args(overrides: dict) -> list[str]:
    """-S ++key=value pairs, as `dvc exp run` takes them (++: set the key whether params.yaml lists it or not, as
    for a training block's key left to the shared `train:` defaults)."""
    pairs = [(k, yaml_scalar(v)) for k, v in flatten(overrides).items()]
    return [arg for key, value in pairs for arg in ("-S", f"++{key}={value}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a file name in presets/, without .yaml")
    parser.add_argument("--queue", action="store_true", help="queue the experiment instead of running it")
    args = parser.parse_args()
    overrides = load_preset(args.name)
    load_params()  # the base itself must be valid
    merged(Path("params.yaml"), overrides)
    cmd = ["dvc", "exp", "run", "--name", args.name, *(["--queue"] if args.queue else []), *set_args(overrides)]
    print(" ".join(cmd), flush=True)
    sys.exit(subprocess.call(cmd, env=env_with_interpreter()))


if __name__ == "__main__":
    main()
