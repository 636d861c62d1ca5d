"""KV transfer over NIXL (UCX): the prefill worker holds, the decode worker READs.

Holder (prefill process): one NIXL agent; the storage's whole buffer is registered once, so the agent
metadata (connection info + the region's remote key, a few hundred bytes) never changes and every
``KVHandle`` carries the same small endpoint. Reader (decode process): its own agent; it loads a
holder's metadata once per holder instance, registers each destination storage once, and READs one
descriptor per run of consecutive blocks (a block is one contiguous region across layers; NIXL costs
~5 µs per descriptor, so never describe pages). The last READ of a handle carries the request id as
its notification: the holder's ``read_done()`` returns it and the engine drops the lease without
waiting for a release.

Endpoint (``NixlHolder.endpoint()``), plain and picklable::

    {"backend": "nixl", "agent": str, "instance": str (hex, new per registration),
     "metadata": bytes (nixl_agent.get_agent_metadata()), "base_addr": int, "bytes_per_block": int,
     "num_blocks": int, "mem_type": "DRAM" | "VRAM", "device_id": int,
     "gen_addr": int (optional: the holder pool's block generations, int64 each, in host memory)}

Metadata travels in the endpoint itself (no listener thread, no port to open, no asynchronous
handshake): the reader is ready as soon as it has a handle. Block b lives at
``base_addr + b * bytes_per_block`` in the holder's process.

No UCX environment variables are needed on one machine (UCX picks shared memory + cma zero-copy and
uses TCP for wire-up; over cma the READ runs inside the post call). A dead holder surfaces as
``nixlRemoteDisconnectError`` within milliseconds; the timeout covers a transfer that never finishes.
Every failure raises TransferError after cancelling the transfer and dropping the holder's
connection (over cma the copy has ended when the post returns; over RDMA closing the endpoint stops
what the cancel could not), so the engine may reuse the destination blocks.

Leases: a one-sided READ cannot ask the holder whether the blocks are still its request's. So
(1) the reader keeps clear of the lease's end: it refuses a handle within ``lease_margin_s`` of
``lease_expires_at`` before posting the READ, and discards a READ that completes within that margin
(the margin also covers clock skew between nodes; NTP gives milliseconds). (2) When the holder
publishes its pool's block generations (``gen_addr``; a generation grows when a block is freed or
handed out, see ``kvstore.block_pool``), the reader READs the source blocks' generations after the
blocks have arrived and refuses them unless they equal the handle's ``block_generations``: the holder
bumps a generation before it can write the block for anyone else, so unchanged generations read
after the copy mean the copy saw the handle's KV. That also covers a lease ended early (a holder
that restarted, a stray release), which no clock can. The notification rides on this last READ, so
the holder cannot drop the lease before the generations are read.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from kvstore.handle import KVHandle

from .block_pool import BlockPool
from .paged import PagedKVStorage
from .transfer import TransferError

log = logging.getLogger(__name__)

_BACKENDS = ["UCX"]
_ENDPOINT_KEYS = frozenset({"backend", "agent", "instance", "metadata", "base_addr", "bytes_per_block", "num_blocks",
                            "mem_type", "device_id"})


def _agent(name: str, progress_thread: bool):
    from nixl._api import nixl_agent, nixl_agent_config  # optional dependency: imported on use

    return nixl_agent(name, nixl_agent_config(backends=_BACKENDS, enable_prog_thread=progress_thread))


_HUGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def advise_huge_pages(buf) -> bool:
    """Back a host tensor's memory with 2 MiB pages (Linux ≥ 6.1; best effort, contents unchanged).

    UCX's cma READ walks the holder's page tables page by page: on 2 MiB pages it ran 1.5–1.8× faster
    here (192 MiB: 4.4 → 6–8 GB/s). Collapsing costs ~60 ms per 192 MiB, once, before registration.
    """
    if buf.is_cuda or not sys.platform.startswith("linux"):
        return False
    start = (buf.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
    end = (buf.data_ptr() + buf.numel() * buf.element_size()) // _HUGE * _HUGE
    if end <= start:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return madvise(start, end - start, _MADV_HUGEPAGE) == 0 and madvise(start, end - start, _MADV_COLLAPSE) == 0
    except (OSError, AttributeError):
        return False


def _region(storage: PagedKVStorage) -> tuple[int, int, int, str]:
    """(base address, bytes, device id, NIXL memory type) of a storage's whole buffer."""
    buf = storage.buffer
    if not buf.is_contiguous():
        raise ValueError("KV storage buffer must be contiguous to register it with NIXL")
    if buf.is_cuda:
        return buf.data_ptr(), buf.numel() * buf.element_size(), buf.device.index or 0, "VRAM"
    return buf.data_ptr(), buf.numel() * buf.element_size(), 0, "DRAM"


def block_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Pair source and destination blocks into runs (src_start, dst_start, length) that are
    consecutive on both sides, in order; one run becomes one descriptor per side."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class NixlHolder:
    """The prefill side: registers ``storage``'s buffer with a NIXL agent named ``name`` (unique in
    the cluster) and reports finished reads from the readers' notifications.

    The holder's UCX worker must make progress for a reader's connection wire-up, for notifications
    and, over TCP, to serve the emulated READ. A compute-bound engine thread cannot promise that, so
    the holder progresses on its own: by default a light daemon thread polls every ``poll_s`` (a
    READ over shared memory, cma or RDMA is one-sided, so the wire-up and notifications are all it
    serves); ``progress_thread=True`` uses NIXL's busy-polling thread instead (~half a core even when
    idle; worth it where UCX falls back to TCP between nodes: measured here 0.9 GB/s vs 0.2 GB/s).

    ``huge_pages``: back a host buffer with 2 MiB pages before registering it (see ``advise_huge_pages``).
    ``listen_port`` must stay None: metadata travels in the endpoint, no listener thread is started.
    """

    def __init__(self, name: str, storage: PagedKVStorage, *, listen_port: int | None = None,
                 progress_thread: bool = False, poll_s: float = 1e-3, huge_pages: bool = True) -> None:
        if listen_port is not None:
            raise ValueError("NixlHolder sends its metadata in the KV handle's endpoint; listen_port must be None")
        self.name, self.storage, self.poll_s = name, storage, poll_s
        self.agent = _agent(name, progress_thread)
        if huge_pages:
            advise_huge_pages(storage.buffer)
        base, nbytes, dev, mem = _region(storage)
        self._reg = self.agent.register_memory([(base, nbytes, dev, "")], mem)
        self._endpoint = {
            "backend": "nixl", "agent": name, "instance": uuid.uuid4().hex,
            "metadata": self.agent.get_agent_metadata(),  # after registration: it carries the region's key
            "base_addr": base, "bytes_per_block": storage.layout.bytes_per_block,
            "num_blocks": storage.num_blocks, "mem_type": mem, "device_id": dev,
        }
        self._done: list[str] = []
        self._lock = threading.Lock()
        self._gen_reg = None
        self._stop = threading.Event()
        # After construction only this thread and bind_pool call the agent (it has no locks of its own).
        self._agent_lock = threading.Lock()
        self._poller = threading.Thread(target=self._poll, name=f"nixl-holder-{name}", daemon=True)
        self._poller.start()

    def endpoint(self, block_ids: Sequence[int] = (), request_id: str = "") -> dict:
        """The same small dict for every handle (block ids travel in the handle itself)."""
        return dict(self._endpoint)

    def bind_pool(self, pool: BlockPool) -> None:
        """Register the pool's block generations (8 bytes a block) and publish them as ``gen_addr``,
        so readers can refuse blocks freed or reused since the hand-off (module docstring)."""
        gens = pool.generation
        addr, n = gens.buffer_info()
        if n != self.storage.num_blocks:
            raise ValueError(f"pool of {n} blocks for a storage of {self.storage.num_blocks}")
        with self._agent_lock:
            if self._gen_reg is not None:
                self.agent.deregister_memory(self._gen_reg)
            self._gen_reg = self.agent.register_memory([(addr, n * gens.itemsize, 0, "")], "DRAM")
            self._endpoint.update(gen_addr=addr, instance=uuid.uuid4().hex,  # new keys: readers reload them
                                  metadata=self.agent.get_agent_metadata())
        self._gens = gens  # pins the array (and so the registered address)

    def read_done(self) -> list[str]:
        """Request ids that readers finished reading since the last call (READ notifications)."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Stop progressing and deregister the buffer; readers' later READs fail with TransferError."""
        self._stop.set()
        self._poller.join()
        for reg in (self._reg, self._gen_reg):
            if reg is not None:
                self.agent.deregister_memory(reg)
        self._reg = self._gen_reg = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                with self._agent_lock:
                    notifs = self.agent.get_new_notifs()  # also progresses the UCX worker
            except Exception:  # keep serving: a bad peer must not stop every other reader
                log.exception("NIXL holder %s: polling notifications failed", self.name)
                continue
            if notifs:
                ids = [m.decode() if isinstance(m, bytes) else str(m) for msgs in notifs.values() for m in msgs]
                with self._lock:
                    self._done += ids


class NixlTransfer:
    """The decode side of the NIXL backend (``KVTransfer``): READs a handle's blocks into local blocks.

    ``name`` must be unique in the cluster (holders see notifications by reader name). ``timeout_s``
    bounds one read from post to completion; ``poll_s`` caps the sleep between polls. The reader
    drives its transfers by polling, so no progress thread by default (see ``NixlHolder``).
    ``huge_pages``: as for ``NixlHolder``, applied to each destination storage when registered.
    ``lease_margin_s``: how far from its lease's end a read must start and finish (module docstring).
    Thread-safe (one read at a time per instance).
    """

    name = "nixl"

    def __init__(self, name: str, *, timeout_s: float = 30.0, poll_s: float = 1e-3, progress_thread: bool = False,
                 huge_pages: bool = True, lease_margin_s: float = 0.5) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if lease_margin_s < 0:
            raise ValueError(f"lease_margin_s must be ≥ 0, got {lease_margin_s}")
        self.agent_name, self.timeout_s, self.poll_s, self.huge_pages = name, timeout_s, poll_s, huge_pages
        self.lease_margin_s = lease_margin_s
        self.agent = _agent(name, progress_thread)
        self._remotes: dict[str, str] = {}  # holder agent name → instance whose metadata is loaded
        self._storages: dict[int, tuple[PagedKVStorage, object]] = {}  # id(storage) → (storage, reg)
        self._gens: tuple[np.ndarray, object] | None = None  # registered landing place of generations
        self._lock = threading.Lock()
        self._stats = {"backend": self.name, "bytes": 0, "transfers": 0, "failures": 0, "seconds": 0.0}

    def stats(self) -> dict:
        """Counters: bytes and transfers that completed, failures, seconds spent in successful reads."""
        return dict(self._stats)

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None:
        with self._lock:
            try:
                n = self._read(handle, dst, list(dst_blocks))
            except TransferError:
                self._stats["failures"] += 1
                raise
            self._stats["transfers"] += 1
            self._stats["bytes"] += n

    def close(self) -> None:
        with self._lock:
            for name in list(self._remotes):
                self._forget(name)
            for _, reg in self._storages.values():
                self.agent.deregister_memory(reg)
            self._storages.clear()
            if self._gens is not None:
                self.agent.deregister_memory(self._gens[1])
                self._gens = None

    # ------------------------------------------------------------------ internals
    def _read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: list[int]) -> int:
        ep = handle.endpoint
        if ep.get("backend") != "nixl":
            raise TransferError(f"handle of {handle.request_id!r} has a {ep.get('backend')!r} endpoint, not nixl")
        if missing := _ENDPOINT_KEYS - ep.keys():
            raise TransferError(f"nixl endpoint of {handle.request_id!r} lacks {sorted(missing)}")
        bpb = dst.layout.bytes_per_block
        if ep["bytes_per_block"] != bpb:
            raise TransferError(
                f"KV block size mismatch for {handle.request_id!r}: holder {ep['agent']!r} has "
                f"{ep['bytes_per_block']} bytes per block, this worker {bpb}")
        src_blocks = list(handle.block_ids)
        if len(dst_blocks) != len(src_blocks):
            raise TransferError(f"{len(dst_blocks)} destination blocks for {len(src_blocks)} source blocks")
        for side, blocks, limit in (("source", src_blocks, ep["num_blocks"]), ("destination", dst_blocks, dst.num_blocks)):
            bad = [b for b in blocks if not 0 <= b < limit]
            if bad:
                raise TransferError(f"{side} block ids {bad[:4]} outside [0, {limit})")
        if "gen_addr" in ep and len(handle.block_generations) != len(src_blocks):
            raise TransferError(f"handle of {handle.request_id!r} carries no block generations; "
                                "its blocks cannot be checked for reuse")
        self._check_lease(handle, "before")
        if not src_blocks:
            return 0
        t0 = time.perf_counter()
        remote = self._remote(ep)
        local_base, _, local_dev, local_mem = self._local(dst)
        runs = np.asarray(block_runs(src_blocks, dst_blocks), dtype=np.uint64)
        lengths = runs[:, 2] * np.uint64(bpb)
        local = np.stack([np.uint64(local_base) + runs[:, 1] * np.uint64(bpb), lengths,
                          np.full(len(runs), local_dev, dtype=np.uint64)], axis=1)
        far = np.stack([np.uint64(ep["base_addr"]) + runs[:, 0] * np.uint64(bpb), lengths,
                        np.full(len(runs), ep["device_id"], dtype=np.uint64)], axis=1)
        check_gens = "gen_addr" in ep
        notif = handle.request_id.encode()
        try:
            self._post(local, local_mem, far, ep["mem_type"], remote, b"" if check_gens else notif, t0, handle)
            gens = self._read_generations(ep["gen_addr"], remote, src_blocks, notif, t0, handle) if check_gens else None
        except Exception as e:  # nixlRemoteDisconnectError & co.: the holder is gone or unreachable
            self._forget(remote)  # the disconnect stops anything the cancel could not
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"NIXL READ of {handle.request_id!r} from {remote!r} failed: {type(e).__name__}: {e}") from e
        if gens is not None and gens != handle.block_generations:
            raise TransferError(f"blocks of {handle.request_id!r} were freed or reused by the holder {remote!r} "
                                "before or during the read")
        self._check_lease(handle, "during")
        self._stats["seconds"] += time.perf_counter() - t0
        return len(src_blocks) * bpb

    def _post(self, local: np.ndarray, local_mem: str, far: np.ndarray, far_mem: str, remote: str, notif: bytes,
              t0: float, handle: KVHandle) -> None:
        """One READ of descriptor rows [address, bytes, device] from ``remote`` into ``local``, waited
        for; cancelled (by releasing it) if it fails."""
        xfer = None
        try:
            xfer = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, local_mem),
                                              self.agent.get_xfer_descs(far, far_mem), remote, notif)
            self._wait(xfer, self.agent.transfer(xfer), t0, handle)
        finally:
            if xfer is not None:
                self._release(xfer)

    def _read_generations(self, gen_addr: int, remote: str, src_blocks: list[int], notif: bytes, t0: float,
                          handle: KVHandle) -> tuple[int, ...]:
        """The holder pool's current generation of each source block (one READ, ``notif`` on it)."""
        n = len(src_blocks)
        if self._gens is None or len(self._gens[0]) < n:
            if self._gens is not None:
                self.agent.deregister_memory(self._gens[1])
            buf = np.zeros(max(n, 256), dtype=np.int64)
            self._gens = (buf, self.agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM"))
        buf = self._gens[0]
        buf[:n] = -1  # no generation is negative: a READ that wrote nothing cannot pass
        runs = np.asarray(block_runs(src_blocks, range(n)), dtype=np.uint64)
        size, lengths, dev = np.uint64(8), runs[:, 2] * np.uint64(8), np.zeros(len(runs), dtype=np.uint64)
        local = np.stack([np.uint64(buf.ctypes.data) + runs[:, 1] * size, lengths, dev], axis=1)
        far = np.stack([np.uint64(gen_addr) + runs[:, 0] * size, lengths, dev], axis=1)
        self._post(local, "DRAM", far, "DRAM", remote, notif, t0, handle)
        return tuple(int(g) for g in buf[:n])

    def _check_lease(self, handle: KVHandle, when: str) -> None:
        # Past its lease the holder may hand the blocks to another request, and a READ (one-sided:
        # the holder is not asked) would copy that request's KV.
        if time.time() + self.lease_margin_s >= handle.lease_expires_at:
            raise TransferError(f"lease on {handle.request_id!r}'s blocks expired {when} the read (or is within "
                                f"{self.lease_margin_s:g} s of it); the holder may have reused them")

    def _wait(self, xfer, state: str, t0: float, handle: KVHandle) -> None:
        delay = 2e-5
        while state == "PROC":
            if time.perf_counter() - t0 > self.timeout_s:
                raise TransferError(f"NIXL READ of {handle.request_id!r} timed out after {self.timeout_s:g} s")
            time.sleep(delay)  # releases the GIL; the backoff keeps short transfers short
            delay = min(delay * 2, self.poll_s)
            state = self.agent.check_xfer_state(xfer)
        if state != "DONE":
            raise TransferError(f"NIXL READ of {handle.request_id!r} failed (state {state})")

    def _release(self, xfer) -> None:
        try:
            xfer.release()
        except Exception as e:
            log.warning("could not release NIXL transfer handle %r: %s", xfer, e)

    def _remote(self, ep: dict) -> str:
        """Load a holder's metadata once per holder instance (a restarted holder has new keys)."""
        name, instance = ep["agent"], ep["instance"]
        if self._remotes.get(name) != instance:
            if name in self._remotes:
                self._forget(name)
            try:
                loaded = self.agent.add_remote_agent(ep["metadata"])
            except Exception as e:
                raise TransferError(f"cannot load NIXL metadata of {name!r}: {type(e).__name__}: {e}") from e
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                self._forget(loaded)
                raise TransferError(f"endpoint names agent {name!r} but its metadata is agent {loaded!r}")
            self._remotes[name] = instance
        return name

    def _forget(self, name: str) -> None:
        """Drop a holder's metadata and connection: a failed or cancelled READ can land nothing later,
        and the next handle from that holder reconnects from scratch."""
        self._remotes.pop(name, None)
        try:
            self.agent.remove_remote_agent(name)
        except Exception as e:
            log.debug("removing NIXL remote agent %r: %s", name, e)

    def _local(self, storage: PagedKVStorage) -> tuple[int, int, int, str]:
        entry = self._storages.get(id(storage))
        if entry is None:
            if self.huge_pages:
                advise_huge_pages(storage.buffer)
            base, nbytes, dev, mem = _region(storage)
            reg = self.agent.register_memory([(base, nbytes, dev, "")], mem)
            self._storages[id(storage)] = entry = (storage, reg)  # holding the storage pins its address
        return _region(entry[0])
