"""Subprocesses that use this interpreter's environment, activated or not."""

import os
import sys


def env_with_interpreter(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with this interpreter's folder first on PATH: `python` and `dvc` in a
    command are the ones installed beside it."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env
