"""The one module where torch touches a device (CPU core or CUDA GPU).

Probes are written against :class:`Device` and never import torch themselves: allocation, the
kernels they time, synchronisation, timers (CUDA events on a GPU, ``perf_counter`` on a CPU) and
the process-group collectives all live here. torch is imported lazily, on first use, so importing
this module is free.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

_torch: Any = None


def torch():
    """The torch module, imported on first use."""
    global _torch
    if _torch is None:
        import torch as t

        _torch = t
    return _torch


def torch_version() -> str:
    return torch().__version__


def cuda_device_count() -> int:
    t = torch()
    return t.cuda.device_count() if t.cuda.is_available() else 0


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class Device:
    """One device a worker owns. ``kind`` is ``"cpu"`` (``index`` = the core it is pinned to) or
    ``"cuda"`` (``index`` = the CUDA device index)."""

    def __init__(self, kind: str, index: int):
        self.kind = kind
        self.index = index
        t = torch()
        t.set_num_threads(1)
        if kind == "cpu":
            os.sched_setaffinity(0, {index})
            self.tdev = t.device("cpu")
        else:
            t.cuda.set_device(index)
            self.tdev = t.device("cuda", index)

    # ---- identity
    def describe(self) -> dict:
        """``{"gpu", "model", "uuid"}`` as torch knows them (telemetry may know more)."""
        if self.kind == "cpu":
            from .cputelemetry import cpu_model

            return {"gpu": f"cpu{self.index}", "model": cpu_model() or "cpu", "uuid": None}
        props = torch().cuda.get_device_properties(self.index)
        uuid = getattr(props, "uuid", None)
        uuid = f"GPU-{uuid}" if uuid is not None and not str(uuid).startswith("GPU-") else uuid
        return {"gpu": uuid or f"cuda{self.index}", "model": props.name, "uuid": uuid}

    def l2_bytes(self) -> int | None:
        if self.kind == "cpu":
            return None
        return getattr(torch().cuda.get_device_properties(self.index), "L2_cache_size", None)

    # ---- memory and kernels
    def randn(self, *shape: int, dtype: str = "fp32"):
        t = torch()
        return t.randn(*shape, dtype=getattr(t, DTYPES[dtype]), device=self.tdev)

    def empty_bytes(self, nbytes: int, pinned_host: bool = False):
        t = torch()
        if pinned_host:
            return t.empty(nbytes, dtype=t.uint8, pin_memory=True)
        buf = t.empty(nbytes, dtype=t.uint8, device=self.tdev)
        buf.fill_(1)  # touch every page, so the first timed copy measures memory, not faults
        return buf

    def matmul_into(self, a, b, out) -> None:
        torch().matmul(a, b, out=out)

    def copy_into(self, dst, src) -> None:
        dst.copy_(src, non_blocking=self.kind == "cuda")

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch().cuda.synchronize(self.index)

    def free(self) -> None:
        if self.kind == "cuda":
            torch().cuda.empty_cache()

    # ---- timing
    def time_batch(self, fn, iters: int) -> float:
        """Seconds taken by ``iters`` calls of ``fn`` on the device (CUDA events on a GPU)."""
        if self.kind == "cuda":
            t = torch()
            start, end = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return time.perf_counter() - t0


def _local_store(dist, store_file: str, rank: int, world_size: int, timeout_s: float):
    """Rank 0 hosts a TCP store on a loopback port it binds itself and writes the port to
    ``store_file`` (atomically); the other ranks wait for the file, then connect."""
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)
        tmp = f"{store_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(store.port))
        os.replace(tmp, store_file)
        return store
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(store_file) as f:
                port = int(f.read())
            break
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not host the rendezvous store within {timeout_s:.0f} s") from None
            time.sleep(0.02)
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)


class Group:
    """The workers' torch.distributed process group. ``data`` carries the measured collective
    (NCCL on GPU, gloo on CPU); ``ctl`` is always gloo, for barriers, timings and gathers."""

    def __init__(
        self,
        device: Device,
        timeout_s: float,
        store_file: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        t = torch()
        self.dist = t.distributed
        backend = "nccl" if device.kind == "cuda" else "gloo"
        kwargs: dict = {"device_id": device.tdev} if device.kind == "cuda" else {}
        timeout = timedelta(seconds=timeout_s)
        if store_file is not None:  # local runner: worker 0 hosts the rendezvous store on loopback
            kwargs.update(
                store=_local_store(self.dist, store_file, rank, world_size, timeout_s), rank=rank, world_size=world_size
            )
        self.dist.init_process_group(backend, timeout=timeout, **kwargs)
        self.rank = self.dist.get_rank()
        self.size = self.dist.get_world_size()
        self.ctl = self.dist.new_group(backend="gloo") if backend == "nccl" else None
        self.device = device

    def barrier(self) -> float:
        """Wait for every rank (after the device's queued work); returns seconds waited."""
        self.device.synchronize()
        t0 = time.perf_counter()
        self.dist.barrier(group=self.ctl)
        return time.perf_counter() - t0

    def barrier_max(self, value: float) -> tuple[float, float]:
        """A barrier that also agrees on a number: (seconds waited, the largest ``value`` of any rank).
        Every rank gets the same maximum, so a loop that stops on it stops on every rank at once."""
        self.device.synchronize()
        t0 = time.perf_counter()
        top = self.max_float(value)
        return time.perf_counter() - t0, top

    def all_reduce(self, tensor) -> None:
        self.dist.all_reduce(tensor)

    def all_gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's list of floats (the lists must have equal length on every rank)."""
        t = torch()
        mine = t.tensor(values, dtype=t.float64)
        out = [t.zeros_like(mine) for _ in range(self.size)]
        self.dist.all_gather(out, mine, group=self.ctl)
        return [o.tolist() for o in out]

    def max_float(self, value: float) -> float:
        t = torch()
        x = t.tensor([value], dtype=t.float64)
        self.dist.all_reduce(x, op=self.dist.ReduceOp.MAX, group=self.ctl)
        return float(x.item())

    def gather_objects(self, obj) -> list | None:
        """Rank 0 gets every rank's object (in rank order); the others get None."""
        out = [None] * self.size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0, group=self.ctl)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (the others pass anything)."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.ctl)
        return box[0]

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - tearing down a broken group must not mask the real error
            pass
