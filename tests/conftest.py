"""Suite-wide: serialize ``ast.parse`` across threads.

CPython 3.11.7 keeps ast.parse's recursion bookkeeping in one interpreter-wide struct, so two threads
parsing at once can make one fail with "SystemError: AST constructor recursion depth mismatch".
Python 3.11's traceback module parses source lines to place its ``^^^`` markers, so an engine thread
logging an exception races any parse in the main thread (Hypothesis describing a strategy, a module
being imported). A lock makes the parses take turns; behaviour is otherwise unchanged.
"""

from __future__ import annotations

import ast
import threading

_parse = ast.parse
_lock = threading.RLock()


def _serialized_parse(*args, **kwargs):
    with _lock:
        return _parse(*args, **kwargs)


_serialized_parse.__doc__ = _parse.__doc__
ast.parse = _serialized_parse
