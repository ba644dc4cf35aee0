"""Python loads this at start-up when tests/chaos is on PYTHONPATH. In the command of the DVC stage that
CHAOS_KILL names (DVC and the Prefect flow set DVC_STAGE for it), it SIGKILLs the process just before the nth
call of a function whose path arguments lie in one of the stage's outputs or their temps (or, `exact`, are one of
the outputs), after writing which point it was to the `fired` file. With a `release` file named, it holds the
stage there instead until that file exists. tests/test_chaos.py drives it."""

import functools
import importlib
import json
import os
import signal
import time
from pathlib import Path


def _touches(args, outputs: list[Path], exact: bool) -> bool:
    for arg in args:
        if not isinstance(arg, str | os.PathLike):
            continue
        path = Path(os.path.abspath(arg))
        for out in outputs:
            if path == out:
                return True
            if exact or out.parent not in path.parents:
                continue
            if out in path.parents or path.relative_to(out.parent).parts[0].startswith(f".{out.name}."):
                return True
    return False


def _arm(spec: dict) -> None:
    module_name, _, attribute = spec["call"].partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    outputs = [Path(os.path.abspath(out)) for out in spec["outputs"]]
    calls = 0

    @functools.wraps(real)
    def killing(*args, **kwargs):
        nonlocal calls
        if not outputs or _touches([*args, *kwargs.values()], outputs, spec.get("exact", False)):
            calls += 1
            if calls == spec["nth"]:
                Path(spec["fired"]).write_text(json.dumps(spec))
                if "release" not in spec:
                    os.kill(os.getpid(), signal.SIGKILL)
                while not Path(spec["release"]).exists():
                    time.sleep(0.1)
        return real(*args, **kwargs)

    setattr(owner, name, killing)


if "CHAOS_KILL" in os.environ:
    _spec = json.loads(os.environ["CHAOS_KILL"])
    if os.environ.get("DVC_STAGE") == _spec["stage"]:
        _arm(_spec)
