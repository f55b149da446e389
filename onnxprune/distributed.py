"""Sharded calibration: the data cut into shards, each calibrated by the ordinary ``calibrate``
on a Ray actor that keeps one ORT session (or one after another in this process), the shards'
statistics added up here.

Statistics are sums and counts, so the total does not depend on how the data is cut or in which
order the shards finish (sums up to floating-point addition order). Every task returns its own
shard's statistics and nothing accumulates inside an actor: Ray restarts a killed actor and runs
its task again, and the total is unchanged. Texts travel raw; workers tokenise them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from onnxprune.calibrate import CalibrationSession, calibrate, calibration_session
from onnxprune.data import Dataset, tokenize, tokenizer_from_json
from onnxprune.errors import OnnxpruneError
from onnxprune.model_io import LoadedModel
from onnxprune.stats import Stats

#: Examples (texts before chunking, or .npz rows) per shard: large enough that sorting by length
#: within a shard pads little and the driver adds few statistics, small enough to balance N workers.
SHARD_EXAMPLES = 256

#: Shards queued per actor: one running, one waiting, so an actor never idles on the driver.
QUEUED_PER_ACTOR = 2

INSTALL_HINT = "--workers needs Ray: pip install 'onnxprune[distributed]'"


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What every shard's calibration shares. ``model`` is a path that every worker can read."""

    model: str
    input_names: tuple[str, ...]
    tokenizer_json: str | None = None  # the tokenizer.json's text, for text shards
    granularity: int = 16
    max_length: int = 256
    batch_size: int = 8
    threads: int | None = None


def shard_dataset(spec: ShardSpec, items: list, tokenizer=None) -> Dataset:
    """A shard's examples: texts are tokenised (and long ones chunked) here, dicts of arrays kept."""
    if items and isinstance(items[0], str):
        tokenizer = tokenizer or tokenizer_from_json(spec.tokenizer_json)
        return Dataset(tokenize(items, tokenizer, spec.max_length, chunk=True), spec.input_names)
    return Dataset(items, spec.input_names)


def calibrate_shard(spec: ShardSpec, items: list, session: CalibrationSession, tokenizer=None) -> Stats:
    return calibrate(session, shard_dataset(spec, items, tokenizer), granularity=spec.granularity,
                     max_length=spec.max_length, batch_size=spec.batch_size, show_progress=False)


class ShardCalibrator:
    """A Ray actor: one ORT session of the model's statistics form, started once; calibrates the shards it
    is given and returns each one's statistics.

    ``before_shard(index)`` runs first in every task (tests use it to hold a task while they
    kill its actor)."""

    def __init__(self, spec: ShardSpec, before_shard: Callable[[int], None] | None = None):
        self.spec, self.before_shard, self.tokenizer = spec, before_shard, None
        # A user's error here (no such model on this node, no attention site) is raised by each
        # task, where it reaches the driver as itself; raised here, it would kill the actor.
        self.session, self.error = None, None
        try:
            self.session = calibration_session(spec.model, spec.granularity, spec.threads)
        except OnnxpruneError as e:
            self.error = e

    def run(self, index: int, items: list, tokenizer_json: str | None) -> Stats:
        if self.error is not None:
            raise self.error
        if self.before_shard is not None:
            self.before_shard(index)
        if self.tokenizer is None and tokenizer_json is not None:
            self.tokenizer = tokenizer_from_json(tokenizer_json)
        return calibrate_shard(self.spec, items, self.session, self.tokenizer)


def calibrate_sharded(
    spec: ShardSpec,
    shards: Iterable[list],
    workers: int | None = None,
    address: str | None = None,
    total: int | None = None,
    show_progress: bool = True,
    before_shard: Callable[[int], None] | None = None,
    loaded: LoadedModel | None = None,
) -> Stats:
    """The statistics of all ``shards`` (lists of texts or of example dicts).

    ``workers``: Ray actors to run them on (None: one after another in this process). With no
    ``address`` and no Ray running, a local Ray instance with ``workers`` CPUs starts and stops
    here. ``total``: examples expected, for the progress bar. ``loaded``: ``spec.model`` already
    read, for a run in this process (it changes the model's graph, as ``calibrate`` does).
    """
    bar = _bar(total, show_progress)
    try:
        if workers is None:
            session = calibration_session(loaded or spec.model, spec.granularity, spec.threads)
            tokenizer = tokenizer_from_json(spec.tokenizer_json) if spec.tokenizer_json else None
            results = ((len(s), calibrate_shard(spec, s, session, tokenizer)) for s in shards)
        else:
            results = _on_ray(spec, shards, workers, address, before_shard)
        stats = None
        for count, partial in results:
            stats = partial if stats is None else stats.add(partial)
            bar.update(count)
    finally:
        bar.close()
    if stats is None:
        raise OnnxpruneError("no calibration data")
    return stats


def _on_ray(spec: ShardSpec, shards: Iterable[list], workers: int, address: str | None,
            before_shard) -> Iterator[tuple[int, Stats]]:
    """(examples, statistics) of each shard as it completes, at most ``QUEUED_PER_ACTOR`` shards
    per actor read ahead (the data streams: the driver never holds more)."""
    try:
        import ray
    except ImportError:
        raise OnnxpruneError(INSTALL_HINT) from None
    tokenizer_json = spec.tokenizer_json
    # Each actor has one CPU unless told otherwise; ORT's default (all cores) would oversubscribe.
    # The tokenizer travels once through the object store, not in every actor's arguments (Ray
    # keeps those for restarts) nor in every task.
    spec = dataclasses.replace(spec, threads=spec.threads or 1, tokenizer_json=None)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, num_cpus=None if address else workers * spec.threads,
                     include_dashboard=False, configure_logging=False, log_to_driver=False)
        except ConnectionError as e:
            raise OnnxpruneError(f"--ray-address {address}: {e}") from None
    actors = []
    try:
        # An actor that cannot be placed never starts, and the shards queued on it would wait forever.
        cpus = ray.cluster_resources().get("CPU", 0)
        if workers * spec.threads > cpus:
            raise OnnxpruneError(f"--workers {workers} × --threads {spec.threads} needs {workers * spec.threads} "
                                 f"CPUs; the Ray cluster has {cpus:g}")
        tokenizer = ray.put(tokenizer_json) if tokenizer_json is not None else None
        # max_restarts / max_task_retries: a dead actor comes back and its queued tasks rerun.
        remote = ray.remote(num_cpus=spec.threads, max_restarts=-1, max_task_retries=-1)(ShardCalibrator)
        actors = [remote.remote(spec, before_shard) for _ in range(workers)]
        pending: dict = {}  # task → (actor, examples)
        queued = dict.fromkeys(range(workers), 0)
        numbered = enumerate(shards)

        def submit() -> None:
            for slot in queued:
                while queued[slot] < QUEUED_PER_ACTOR and (item := next(numbered, None)) is not None:
                    index, shard = item
                    pending[actors[slot].run.remote(index, shard, tokenizer)] = (slot, len(shard))
                    queued[slot] += 1

        submit()
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            slot, count = pending.pop(done)
            queued[slot] -= 1
            yield count, _result(ray, done)
            submit()
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _result(ray, task) -> Stats:
    try:
        return ray.get(task)
    except ray.exceptions.RayTaskError as e:
        # The worker's one-line error (bad data, a model ORT refuses) is the user's, not a bug.
        if isinstance(e.cause, OnnxpruneError):
            raise OnnxpruneError(str(e.cause)) from None
        raise


def _bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    # disable=None: drawn only on a terminal (as onnxprune.progress does).
    return tqdm(total=total, desc="calibrating", unit="example", dynamic_ncols=True, leave=False,
                disable=None if enabled else True)
