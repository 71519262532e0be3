"""Everything that touches Ray (lpcv-depth search). ray is imported lazily, so the rest of the project
works without it, and a missing install names the exact command that fixes it.

By default a Ray instance is started for the run on this machine and stopped at its end. With an
address, the run joins an existing cluster, which must see the search's output folder at the same
path on every node (see docs/search.md, "On a cluster").
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lpcv_depth.errors import ConfigError, LpcvError, MissingDependencyError
from lpcv_depth.pins import pinned

__all__ = ["RAY_INSTALL", "import_ray", "check_address", "RayCluster", "NodeInfo", "WorkspaceNotSharedError",
           "TrialPool"]

RAY_INSTALL = f'pip install "{pinned("ray")}"   (or: pip install -e ".[search]")'
DEFAULT_RAY_PORT = 6379
RAY_CLIENT_PORT = 10001
ADDRESS_TIMEOUT_S = 3.0
# The objects passed between the driver and the trials are small dicts; the artifacts travel on disk.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
PROBE_TIMEOUT_S = 120.0


class WorkspaceNotSharedError(LpcvError):
    """A node of the cluster cannot see the search's output folder."""


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise MissingDependencyError(f"ray is not importable: {err}", hint=RAY_INSTALL) from err
    return ray


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail in seconds when nothing answers at a cluster address (Ray itself retries for a minute).

    Takes HOST:PORT (the head's GCS, port 6379 by default), ray://HOST:PORT (Ray Client, 10001) or
    `auto` (the cluster `ray start` left on this machine, which Ray finds itself)."""
    if address == "auto":
        return
    client = address.startswith("ray://")
    host, _, port_text = address.removeprefix("ray://").rpartition(":")
    if not host:
        host, port_text = port_text, str(RAY_CLIENT_PORT if client else DEFAULT_RAY_PORT)
    if not port_text.isdigit() or not host:
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto",
                          hint="pass the address `ray start --head` printed, e.g. --ray-address 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConfigError(f"no Ray cluster answers at --ray-address {address}: {err.strerror or err}",
                          hint="start one with `ray start --head --port "
                               f"{port_text}` on that machine (and `ray start --address {host}:{port_text}` on "
                               "each worker), check the address and firewall, or leave --ray-address out to run "
                               "on this machine") from None


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    cpus: float
    memory_bytes: float


class RayCluster:
    """A connection to Ray for one search: `with RayCluster(address) as cluster: ...`."""

    def __init__(self, address: str | None, *, local_cpus: int | None = None):
        self.address = address
        self.local_cpus = local_cpus or os.cpu_count() or 1
        self.ray = None

    def __enter__(self) -> "RayCluster":
        ray = import_ray()
        if self.address is not None:
            check_address(self.address)
        try:
            if self.address is None:
                ray.init(num_cpus=self.local_cpus, num_gpus=0, include_dashboard=False, log_to_driver=False,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception as err:  # noqa: BLE001 - Ray raises many types here; every one means "no cluster"
            where = f"at {self.address}" if self.address else "on this machine"
            auth = "token" in str(err).lower() or "authenticat" in type(err).__name__.lower()
            raise ConfigError(f"cannot start or join Ray {where}: {type(err).__name__}: {str(err).splitlines()[0]}",
                              hint="the cluster uses token authentication: export RAY_AUTH_TOKEN (or "
                                   "~/.ray/auth_token) as on its nodes" if auth else
                              "check `ray status` on the head node; or run without a cluster (leave out "
                              "--ray-address), or without Ray (--ray-address none)") from None
        self.ray = ray
        return self

    def __exit__(self, *exc) -> bool:
        if self.ray is not None:
            self.ray.shutdown()
        return False

    @property
    def is_local(self) -> bool:
        return self.address is None

    def nodes(self) -> list[NodeInfo]:
        """Alive nodes that can run a trial (a head started with --num-cpus 0 runs none)."""
        found = []
        for node in self.ray.nodes():
            resources = node.get("Resources", {})
            if node.get("Alive") and resources.get("CPU", 0) > 0:
                found.append(NodeInfo(node["NodeID"], node.get("NodeManagerAddress", "?"), resources["CPU"],
                                      resources.get("memory", 0.0)))
        return found

    def check_fits(self, cpus: float, memory_bytes: float) -> int:
        """How many trials of this size the cluster runs at once; an error when no node can run one."""
        nodes = self.nodes()
        if not nodes:
            raise ConfigError("the Ray cluster has no alive node with CPUs to run trials",
                              hint="start a worker: ray start --address HEAD:PORT")
        fitting = [n for n in nodes if n.cpus >= cpus and n.memory_bytes >= memory_bytes]
        if not fitting:
            largest = max(nodes, key=lambda n: n.cpus)
            raise ConfigError(f"no Ray node can run a trial needing {cpus:g} CPUs and {memory_bytes / 2**30:.1f} GiB "
                              f"(largest: {largest.cpus:g} CPUs, {largest.memory_bytes / 2**30:.1f} GiB)",
                              hint=f"lower --trial-cpus (at most {largest.cpus:g}) or --trial-memory-gb")
        return sum(min(int(n.cpus // cpus), int(n.memory_bytes // memory_bytes) if memory_bytes else 10**6)
                   for n in fitting)

    def check_shared_folder(self, folder: Path, probe: Callable[[str, str], str] | None = None) -> None:
        """Every node must read a file the driver writes into `folder`, at the same path: trials
        write their artifacts there, and the driver reads them back."""
        folder = Path(folder).resolve()
        token = uuid.uuid4().hex
        marker = folder / f".ray-probe-{token}"
        marker.write_text(token)
        try:
            nodes = self.nodes()
            seen = probe_nodes(self.ray, nodes, os.fspath(marker)) if probe is None else {
                n.node_id: probe(n.node_id, os.fspath(marker)) for n in nodes}
        finally:
            marker.unlink(missing_ok=True)
        blind = [f"{n.address} ({seen[n.node_id]})" for n in nodes if seen[n.node_id] != token]
        if blind:
            raise WorkspaceNotSharedError(
                f"the search folder {folder} is not shared with every Ray node: {', '.join(blind)} cannot read it",
                hint="put --out (or --workspace) on a filesystem every node mounts at the same path (NFS, a "
                     "cluster filesystem), see docs/search.md; or leave --ray-address out to run on this machine")

    def pool(self, function: Callable, *, cpus: float, memory_bytes: float) -> "TrialPool":
        return TrialPool(self.ray, function, cpus=cpus, memory_bytes=memory_bytes)


def _read_marker(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"


def probe_nodes(ray, nodes: list[NodeInfo], path: str) -> dict[str, str]:
    """What each node reads at `path`, from a task pinned to that node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0)(_read_marker)
    refs = {n.node_id: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
            .remote(path) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    done = set(ready)
    return {node: ray.get(ref) if ref in done else f"no answer in {PROBE_TIMEOUT_S:.0f}s"
            for node, ref in refs.items()}


class TrialPool:
    """Runs `function(payload)` as Ray tasks with a CPU and memory request each; `wait` returns
    finished (handle, value) pairs. The task sets its thread count to its CPU share, so trials on
    one node never oversubscribe it."""

    def __init__(self, ray, function: Callable, *, cpus: float, memory_bytes: float):
        self.ray = ray
        options: dict[str, Any] = {"num_cpus": cpus, "max_retries": 0}
        if memory_bytes:
            options["memory"] = int(memory_bytes)
        self.remote = ray.remote(_in_worker).options(**options)
        self.function = function
        self.threads = max(1, math.floor(cpus))
        self.running: dict[Any, Any] = {}

    def submit(self, key: Any, payload: Any) -> None:
        self.running[self.remote.remote(self.function, payload, self.threads)] = key

    def wait(self) -> list[tuple[Any, Any]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        finished = []
        for ref in ready:
            key = self.running.pop(ref)
            try:
                finished.append((key, self.ray.get(ref)))
            except Exception as err:  # noqa: BLE001 - a dead worker (OOM kill, crash) fails its trial only
                finished.append((key, err))
        return finished


def _in_worker(function: Callable, payload: Any, threads: int) -> Any:
    limit_threads(threads)
    return function(payload)


def limit_threads(threads: int) -> None:
    """torch and the BLAS pools use `threads` (ONNX Runtime sessions are told per stage)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)
