"""sources: a fingerprint of every ingest source (per source: files, bytes, a digest of every file's path, size
and modification time or ETag), so that `dvc repro` (and each scheduled run) notices new or changed input data
anywhere fsspec reaches, which DVC cannot track itself.

DVC runs this stage every time (always_changed); it only lists files, so it is quick, and ingest reruns only
when the fingerprint differs. A stage that runs every time logs no MLflow run (it would add one per repro).
"""

import logging

from lm import io
from lm.sources import fingerprint
from stages import cli
from stages.config import Params
from stages.tracking import Tracker

log = logging.getLogger("stages.sources")


def run(params: Params, tracker: Tracker) -> dict:
    found = fingerprint([source.path for source in params.ingest.sources], params.ingest.extensions)
    io.write_json(params.paths.sources_fingerprint, found)  # DVC compares it with the last run's
    log.info("sources: %s", found["sources"])
    return found


if __name__ == "__main__":
    cli.main(run)
