"""EngineLoop (a thread stepping engines) and EngineWorker (an engine's asyncio face).

Plain classes: local mode runs them in-process; cluster mode wraps the same worker in a Ray Serve
deployment. No Ray imports here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from kvstore.hashing import BlockHash
from workers.engine.engine import Engine
from workers.engine.peer import export_id
from workers.host import set_engine_thread
from workers.engine.types import GenerateRequest, KVHandle, RequestOutput, WorkerError, WorkerStats
from workers.parallel.group import ExpertParallelError

log = logging.getLogger(__name__)


class EngineLoop:
    """Steps its engines round-robin on one daemon thread; sleeps while none has work.

    A request's failure is handled inside ``Engine.step``. When a step raises anyway (the engine
    as a whole is broken), every request in flight on every engine ends with the error at once, and
    then the loop restarts: each engine is ``reset`` to an empty one and stepping resumes, after a
    pause that doubles while crashes follow each other closely. ``ExpertParallelError`` (the
    expert-parallel group is broken) and non-``Exception`` errors stop the loop for good.

    ``error``: the crash that keeps the loop from serving — set while it restarts and once it has
    stopped for good, None while it serves. ``last_crash`` keeps the latest crash, ``restarts``
    counts them; ``health_error()`` says in words why the loop does not serve, or None.
    """

    RESTART_PAUSE_S = 0.05  # first pause before a restart; doubled per crash in quick succession
    MAX_RESTART_PAUSE_S = 10.0

    def __init__(self, engines: list[Engine], name: str = "dsaserve-engine", num_threads: int | None = None) -> None:
        """``num_threads``: intra-op threads of the loop's thread (None: torch's process default);
        see ``workers.host`` for why the main thread should keep one."""
        self.engines = engines
        self.num_threads = num_threads
        self._stop = threading.Event()
        self._wake = threading.Event()
        for engine in engines:
            engine.wake_event = self._wake  # one event wakes the loop whichever engine got work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        self.last_crash: BaseException | None = None
        self.restarts = 0
        self._dead = False

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def health_error(self) -> str | None:
        """Why the loop does not serve now (crashed for good, restarting after a crash, stopped, not
        started), or None while it serves."""
        error = self.error
        if error is not None:
            return f"engine loop crashed: {error}" if self._dead else f"engine loop restarting after a crash: {error}"
        if self._stop.is_set():
            return "engine loop stopped"
        if not self._thread.is_alive():
            return "engine loop not running"
        return None

    def _run(self) -> None:
        pause, last = self.RESTART_PAUSE_S, float("-inf")
        while not self._stop.is_set():
            try:
                self._serve()
                return
            except BaseException as e:  # a crash must not hang every caller forever
                fatal = isinstance(e, ExpertParallelError) or not isinstance(e, Exception)
                self._dead = fatal
                self.error = self.last_crash = e
                log.exception("engine loop crashed%s", "" if fatal else "; restarting")
                self._fail_all(f"engine loop crashed: {e}")
                if fatal:
                    return
            now = time.monotonic()
            pause = min(pause * 2, self.MAX_RESTART_PAUSE_S) if now - last < 4 * pause else self.RESTART_PAUSE_S
            last = now
            if self._stop.wait(pause) or not self._reset():
                return

    def _serve(self) -> None:
        set_engine_thread(self.num_threads)
        while not self._stop.is_set():
            self._wake.clear()
            busy = False
            for engine in self.engines:
                busy = engine.step() or busy
            if not busy:
                # Idle until a command arrives; the timeout keeps lease expiry ticking.
                self._wake.wait(0.05)

    def _fail_all(self, message: str) -> None:
        for engine in self.engines:  # end every request in flight with the error, now
            try:
                engine.fail_all(message)
            except Exception:
                log.exception("failing the requests of %s", engine.worker_id)

    def _reset(self) -> bool:
        """Reset every engine; False (and the loop stays down) if that fails too."""
        try:
            for engine in self.engines:
                engine.reset()
        except Exception as e:
            self._dead = True
            self.error = self.last_crash = e
            log.exception("engine loop could not restart")
            return False
        self.restarts += 1
        self.error = None
        log.warning("engine loop restarted (%d restarts)", self.restarts)
        return True


class EngineWorker:
    """Async calls into an Engine running on an EngineLoop thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def worker_id(self) -> str:
        return self.engine.worker_id

    def stats(self) -> WorkerStats:
        return self.engine.stats()

    def release(self, request_id: str) -> None:
        """Drop the lease on a prefilled request's blocks."""
        self.engine.release(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def generate(self, request: GenerateRequest, prefix: KVHandle | None = None) -> AsyncIterator[RequestOutput]:
        """Whole request on this engine (role ``both``, or a fallback). Closing the iterator aborts.
        ``prefix``: a peer's exported prompt blocks to read first (``export``)."""
        queue = self._bridge()
        self.engine.add_request(request, queue.put_threadsafe, prefix)
        async with aclosing(self._drain(queue, request.request_id)) as outs:
            async for out in outs:
                yield out

    async def prefill(self, request: GenerateRequest, prefix: KVHandle | None = None) -> KVHandle:
        """Prefill on a ``prefill``-role engine → the leased KV handle (first token included)."""
        queue = self._bridge()
        self.engine.add_request(request, queue.put_threadsafe, prefix)
        try:
            item = await queue.get()
        except BaseException:
            self.engine.abort(request.request_id)
            raise
        if isinstance(item, RequestOutput):
            raise WorkerError(item.error or f"prefill finished with {item.finish_reason}")
        return item

    async def decode(self, request: GenerateRequest, handle: KVHandle, on_read) -> AsyncIterator[RequestOutput]:
        """Import ``handle`` and decode. ``on_read(error | None)`` runs (engine thread) once the blocks
        are read or the read failed; on failure this raises the TransferError."""
        queue = self._bridge()
        loop = asyncio.get_running_loop()
        read_done: asyncio.Future = loop.create_future()

        def _on_read(err: Exception | None) -> None:
            on_read(err)
            loop.call_soon_threadsafe(lambda: read_done.done() or read_done.set_result(err))

        self.engine.import_kv(request, handle, queue.put_threadsafe, _on_read)
        try:
            err = await read_done
        except BaseException:
            self.engine.abort(request.request_id)
            raise
        if err is not None:
            raise err
        async with aclosing(self._drain(queue, request.request_id)) as outs:
            async for out in outs:
                yield out

    async def export(self, request_id: str, hashes: list[BlockHash], first_block: int) -> KVHandle | None:
        """Lease the longest prefix of ``hashes`` this worker holds for a peer (None: it holds none).
        The lease ends at ``release(workers.engine.peer.export_id(request_id))`` or at its expiry."""
        queue = self._bridge()
        self.engine.export_prefix(request_id, hashes, first_block, queue.put_threadsafe)
        try:
            return await queue.get()
        except BaseException:  # the caller gave up: nobody will read the blocks
            self.engine.release(export_id(request_id))
            raise

    def _bridge(self) -> "_ThreadQueue":
        return _ThreadQueue(asyncio.get_running_loop())

    async def _drain(self, queue: "_ThreadQueue", request_id: str) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.abort(request_id)


class _ThreadQueue(asyncio.Queue):
    """An asyncio.Queue that the engine thread can put into."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop_ref = loop

    def put_threadsafe(self, item) -> None:
        self._loop_ref.call_soon_threadsafe(self.put_nowait, item)
