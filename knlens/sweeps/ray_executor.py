"""The Ray executor (``knlens sweep --executor ray``): one Ray actor per worker, each loading the model once, and
the items fanned out to them as they free up. Every value comes back to the driver (a sweep's
:class:`~knlens.sweeps.executors.Outcome` carries its result as the files of the result contract), which files
it in the store exactly as with the local executor: the store needs no shared filesystem, and a sweep killed at
any point resumes the same way.

Ray is an optional extra (``pip install 'knlens[ray]'``), imported only here and only when asked for. An
address that cannot be reached is refused before any work:

>>> RayExecutor("tiny-llama", address="127.0.0.1:9")  # nothing listens on port 9
Traceback (most recent call last):
...
knlens.core.errors.RayUnreachableError: cannot reach the Ray cluster at '127.0.0.1:9' (...): ...
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from knlens.core import models
from knlens.core.errors import KnlensError, RayNotInstalledError, RayUnreachableError, RayWorkerError, SweepError
from knlens.core.versions import __version__

__all__ = ["RayExecutor", "check_reachable", "import_ray"]

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a Ray address to answer before :class:`~knlens.core.errors.RayUnreachableError`."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`~knlens.core.errors.RayNotInstalledError` naming the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise RayNotInstalledError("the ray executor needs Ray, an optional extra of knlens: "
                                   "pip install 'knlens[ray]'") from err
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Return when something answers at ``address`` (``host:port``, the head node's GCS port, or
    ``ray://host:port`` for Ray Client) within ``timeout`` seconds; otherwise
    :class:`~knlens.core.errors.RayUnreachableError` naming it. ``auto`` (the cluster ``ray start`` left on this
    machine) is left to Ray.

    >>> check_reachable("127.0.0.1")
    Traceback (most recent call last):
    ...
    knlens.core.errors.SweepError: a Ray address is host:port ...
    """
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SweepError(f"a Ray address is host:port (the head node's GCS port, 6379 unless changed) or "
                         f"ray://host:port (Ray Client, 10001), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise RayUnreachableError(f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}): check the "
                                  f"host and port, or start the cluster ('ray start --head' on its head node)") from err


def _connect(ray: Any, address: str | None) -> bool:
    """Connect this process to Ray at ``address`` (``None``: start a Ray instance on this machine); True when
    this call connected it (and so the executor disconnects it), False when it was connected already."""
    if ray.is_initialized():
        if address:
            raise SweepError(f"this process is connected to Ray already (ray.init): leave the Ray address out to "
                             f"use that connection, got {address!r}")
        return False
    if address:
        check_reachable(address)
    try:
        ray.init(address=address) if address else ray.init(include_dashboard=False)
    except (ConnectionError, TimeoutError, RuntimeError) as err:  # what ray.init raises for a cluster it cannot join
        raise RayUnreachableError(f"cannot connect to the Ray cluster at {address!r}: "
                                  f"{' '.join(str(err).split())[:300]}") from err
    return True


class _Worker:
    """A Ray actor's code: loads the model once (:meth:`ready`), then runs jobs with it."""

    def __init__(self, model: str, threads: int) -> None:
        self.name, self.threads, self.model = model, threads, None

    def ready(self) -> str:
        import torch

        torch.set_num_threads(self.threads)
        self.model = models.load_model(self.name)
        return __version__

    def run(self, job: Callable[[Any, Any], Any], item: Any) -> Any:
        return job(self.model, item)


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else err).strip().splitlines()
    return text[0] if text else type(err).__name__


class RayExecutor:
    """Run jobs on ``workers`` Ray actors (default: as many as the cluster's CPUs allow), each reserving
    ``worker_cpus`` CPUs (its torch threads) and loading ``model`` (a name for :func:`knlens.load_model`) once.

    ``address``: a running cluster (``host:port`` or ``ray://host:port``; default ``$RAY_ADDRESS``), checked
    before any work; none starts Ray on this machine; a process already connected with ``ray.init()`` uses
    that connection. Actors start with the first items (never more than there are items waiting), and every
    worker must run this knlens version. A worker that dies fails its item (``on_error``), the others go on, and
    another worker takes its place while items wait.
    """

    def __init__(self, model: str, *, address: str | None = None, workers: int | None = None,
                 worker_cpus: float = 1.0) -> None:
        if not isinstance(model, str):
            raise SweepError("the ray executor takes the model by name (each worker loads it), not a loaded model")
        if workers is not None and workers < 1:
            raise SweepError(f"workers must be at least 1, got {workers}")
        if worker_cpus <= 0:
            raise SweepError(f"worker_cpus must be positive, got {worker_cpus}")
        self._ray = import_ray()
        self.model, self.worker_cpus = model, worker_cpus
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self._actors: list[Any] = []
        self._idle: list[Any] = []
        self._starting: dict[Any, Any] = {}  # the ready() reference of an actor loading its model -> the actor
        self._owns = _connect(self._ray, self.address)
        cpus = self._ray.cluster_resources().get("CPU", 0.0)
        if cpus < worker_cpus:
            self.close()
            raise RayWorkerError(f"the Ray cluster at {self.address or 'this machine'} has {cpus:g} CPUs: it cannot "
                                 f"place a worker of {worker_cpus:g} CPUs (worker_cpus)")
        self.workers = workers or max(1, int(cpus // worker_cpus))
        self._actor_class = self._ray.remote(num_cpus=worker_cpus)(_Worker)

    def map(self, job: Callable[[Any, Any], Any], items: Sequence[Any],
            on_error: Callable[[Any, BaseException], Any] | None = None) -> Iterator[tuple[Any, Any]]:
        """``(item, job(model, item))`` as each item ends on a worker, in the order they end."""
        ray = self._ray
        queue = deque(items)
        running: dict[Any, tuple[Any, Any]] = {}
        try:
            while queue or running:
                for _ in range(min(self.workers, len(queue)) - len(self._actors)):  # start or replace workers
                    actor = self._actor_class.remote(self.model, max(1, int(self.worker_cpus)))
                    self._actors.append(actor)
                    self._starting[actor.ready.remote()] = actor
                while queue and self._idle:
                    actor, item = self._idle.pop(), queue.popleft()
                    running[actor.run.remote(job, item)] = (actor, item)
                [ref], _ = ray.wait([*running, *self._starting], num_returns=1)
                if ref in self._starting:
                    self._started(ref, self._starting.pop(ref))
                    continue
                actor, item = running.pop(ref)
                try:
                    value = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                    value = self._lost(actor, item, err, on_error)
                else:
                    self._idle.append(actor)
                yield item, value
        finally:
            for actor, _ in running.values():  # left before their items ended (an error, Ctrl-C): abandoned
                self._drop(actor)

    def _started(self, ref: Any, actor: Any) -> None:
        """``actor`` has loaded the model, or could not: its error (a KnlensError as it is) stops the sweep."""
        try:
            version = self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, KnlensError):
                raise err.cause from None
            raise RayWorkerError(f"a Ray worker could not load model {self.model!r}: {_first_line(err)}") from err
        except self._ray.exceptions.RayActorError as err:
            raise RayWorkerError(f"a Ray worker died loading model {self.model!r}: {_first_line(err)}") from err
        if version != __version__:
            raise RayWorkerError(f"a Ray worker runs knlens {version} and this driver knlens {__version__}: its "
                                 f"results would be filed under the other version's keys; install one knlens everywhere")
        self._idle.append(actor)

    def _lost(self, actor: Any, item: Any, err: BaseException,
              on_error: Callable[[Any, BaseException], Any] | None) -> Any:
        """The value of an item whose worker died or could not send its value back."""
        died = isinstance(err, self._ray.exceptions.RayActorError)
        if died:
            self._drop(actor)
        else:
            self._idle.append(actor)
        what = "died running it" if died else "could not finish it"
        error = RayWorkerError(f"the Ray worker {what} ({_first_line(err)})")
        error.__cause__ = err
        if on_error is None:
            raise error
        return on_error(item, error)

    def _drop(self, actor: Any) -> None:
        self._ray.kill(actor)
        self._actors.remove(actor)

    def close(self) -> None:
        """Stop the workers, and disconnect from Ray when this executor connected."""
        for actor in list(self._actors):
            self._drop(actor)
        self._idle, self._starting = [], {}
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
