"""Ray Train's process group, with every listening socket on the node's own address.

Ray Train's default rendezvous (`env://`) has rank 0 start torch's TCPStore, whose server
listens on every interface of the node, and gloo picks its interface from the hostname.
Here rank 0 binds the store's socket itself, to the address Ray knows the node by (loopback
for an embedded Ray), and hands it to the TCPStore; gloo and NCCL are pointed at the
interface holding that address (unless `GLOO_SOCKET_IFNAME`/`NCCL_SOCKET_IFNAME` say
otherwise), and every collective, in the world group and in any group made later, gives up
after `cluster.collective_timeout_s`. Everything else is Ray Train's own torch backend.

Runs in Ray Train's controller (the backend) and its workers (the functions it sends them);
it imports no rank code.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import psutil
import ray
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None  # rank 0's store socket, between the two calls


def interface_of(address: str) -> str | None:
    """The network interface that holds `address` on this machine."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def _open_store_socket() -> tuple[str, int]:
    """On rank 0: a socket bound to this node's address, listening; its address and port."""
    global _listener
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _listener = socket.socket(family, socket.SOCK_STREAM)
    _listener.bind((host, 0))
    _listener.listen(128)
    return host, _listener.getsockname()[1]


def _join_group(
    backend: str, world_rank: int, world: int, host: str, port: int, timeout_s: int
) -> None:
    interface = interface_of(ray.util.get_node_ip_address())
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if backend == "nccl":  # as Ray Train does: fail a timed-out collective instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    # Groups made later without a timeout of their own (DeepSpeed's data-parallel and ZeRO
    # groups: `new_group(ranks)`) take torch's module default, 30 min, not the world group's:
    # a partitioned node then hung every rank that long. They get this one too.
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    if world_rank == 0:
        global _listener
        fd = _listener.detach()  # the store owns the socket from here on
        _listener = None
        store = dist.TCPStore(host, port, world, True, timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(host, port, world, False, timeout)
    dist.init_process_group(
        backend, store=store, rank=world_rank, world_size=world, timeout=timeout
    )


class _NodeBoundBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        host, port = worker_group.execute_single(0, _open_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK etc., as Ray's
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_group,
                    backend=backend,
                    world_rank=rank,
                    world=len(worker_group),
                    host=host,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


class NodeBoundTorchConfig(TorchConfig):
    """`TorchConfig` whose process group listens only on the node's address."""

    @property
    def backend_cls(self) -> type:
        return _NodeBoundBackend
