"""Jobs spread over worker processes: what a stage's `workers` setting runs on (ingest, tokenize)."""

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor


class Workers:
    """`count` spawned processes, started at the first map() with more than one job and kept until the with-block
    ends (a stage's phases share them, so they start once); with count 1, or a single job, jobs run in this
    process. initializer(count) runs first in each process."""

    def __init__(self, count: int, initializer: Callable[[int], None] | None = None):
        self.count, self.initializer = count, initializer
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable, jobs: list[tuple]) -> Iterator:
        """fn(*job) for every job, yielded in the jobs' order. The first failure in job order is raised, and the
        jobs not yet started are dropped."""
        if self.count == 1 or len(jobs) < 2:
            for job in jobs:
                yield fn(*job)
            return
        if self.pool is None:
            # spawned, not forked: the stage may hold threads (MLflow's, tokenizers') whose locks a fork copies held
            context = multiprocessing.get_context("spawn")
            initargs = (self.count,) if self.initializer else ()
            self.pool = ProcessPoolExecutor(self.count, context, self.initializer, initargs)
        futures = [self.pool.submit(fn, *job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
