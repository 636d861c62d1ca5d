"""Suite-wide: ``ast.parse`` runs with the garbage collector off, one thread at a time.

CPython 3.11.7 keeps ast.parse's recursion bookkeeping in one interpreter-wide struct, so a second parse
that starts while one is converting its tree corrupts it, and the first fails with "SystemError: AST
constructor recursion depth mismatch (before=195, after=218)". A second parse starts that way when the
collector runs mid-conversion and a finalizer logs an exception (an asyncio future whose error nobody
read): Python 3.11's traceback module parses source lines to place its ``^^^`` markers. It also starts
when another thread (an engine thread logging an exception) parses at the same moment. The suite creates
both situations (servers, engine threads, Hypothesis); with the collector paused during a parse and a
lock around it, parses cannot overlap. Behaviour is otherwise unchanged.
"""

from __future__ import annotations

import ast
import gc
import threading

_parse = ast.parse
_lock = threading.RLock()


def _serialized_parse(*args, **kwargs):
    with _lock:
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _parse(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()


_serialized_parse.__doc__ = _parse.__doc__
ast.parse = _serialized_parse
