"""The Python guest of malt: a notebook-like session behind the
`malt:worker` world.

`eval` runs code in one persistent namespace; the value of a trailing
expression is the result (as in Jupyter), None otherwise. `call` calls a
function defined earlier. Values cross as MessagePack. Errors are Python
tracebacks of the user's frames. A cooperative interrupt raises
KeyboardInterrupt in running code (checked on loop jumps, and in
`time.sleep`, `malt.sleep` and `malt.channel_take`).
"""

import ast
import builtins
import linecache
import os
import sys
import time
import traceback

from componentize_py_types import Err
from wit_world.imports import host
import wit_world

import _msgpack
import malt

# The standard library a cell can import. Only what is imported while the
# component is built exists at run time: these are imported here, once.
import base64, collections, csv, dataclasses, datetime, decimal, fractions  # noqa: E401,F401
import functools, hashlib, itertools, json, math, random, re, statistics  # noqa: E401,F401
import string, textwrap, typing, enum, heapq, bisect, copy, operator  # noqa: E401,F401
import pprint, uuid, io, contextlib, abc, numbers, array, struct  # noqa: E401,F401

# -- the session ------------------------------------------------------------

_namespace = {"__name__": "__main__", "__builtins__": builtins}
_cells = 0
_started = False


def _begin():
    """Before each request: the first one starts the session; an interrupt
    left pending by the last one is forgotten."""
    if not _started:
        _start()
    if _pending:
        _lines_off()


def _start():
    """Once, at the first request (not while the component is built: a seed
    taken then would be the same in every worker)."""
    global _started
    _started = True
    random.seed()
    # The manager's python_path directories, searched before the rest.
    extra = [p for p in os.environ.get("MALT_PYTHON_PATH", "").split(":") if p]
    sys.path[:0] = extra


# -- interrupts ---------------------------------------------------------------

_monitoring = sys.monitoring
_TOOL = 4
_JUMP = _monitoring.events.JUMP
_LINE = _monitoring.events.LINE
_CHECK_EVERY = 1000
_jumps = 0
_pending = False


# Every 1000 loop jumps, ask the host. An exception raised by a JUMP
# callback escapes the `try` around the loop (CPython 3.12-3.14), one
# raised by a LINE callback does not: so an interrupt turns on LINE events
# and the next line raises KeyboardInterrupt where the user's code can
# catch it. A loop on one line has no next line: 1000 jumps later the JUMP
# callback raises it itself (the cell ends; the namespace is intact).
def _on_jump(code, source, destination):
    global _jumps, _pending
    _jumps += 1
    if _jumps >= _CHECK_EVERY:
        _jumps = 0
        if _pending:
            _lines_off()
            raise KeyboardInterrupt
        if host.interrupted():
            _pending = True
            _monitoring.set_events(_TOOL, _JUMP | _LINE)


def _on_line(code, line):
    _lines_off()
    raise KeyboardInterrupt


def _lines_off():
    global _pending
    _pending = False
    _monitoring.set_events(_TOOL, _JUMP)


_monitoring.use_tool_id(_TOOL, "malt")
_monitoring.register_callback(_TOOL, _JUMP, _on_jump)
_monitoring.register_callback(_TOOL, _LINE, _on_line)
_monitoring.set_events(_TOOL, _JUMP)

# Python's own sleep is a WASI clock wait: make it answer interrupts too.
time.sleep = malt.sleep

# -- errors -----------------------------------------------------------------

_HERE = __file__


def _traceback(error):
    """The traceback of the user's frames (this module's are plumbing)."""
    if isinstance(error, SyntaxError) and str(error.filename).startswith("<cell"):
        # A cell that does not parse: its line and the caret, no frames.
        return "".join(traceback.format_exception_only(error)).rstrip("\n")
    te = traceback.TracebackException.from_exception(error)
    frames = list(te.stack)
    while frames and frames[0].filename in (_HERE, "<string>"):
        frames.pop(0)
    te.stack = traceback.StackSummary.from_list(frames)
    return "".join(te.format()).rstrip("\n")


def _encode(value):
    try:
        return _msgpack.packb(value)
    except _msgpack.UnsupportedType as e:
        raise Err(str(e)) from None


def _finish():
    # Output goes to the manager when the request ends, not later.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# Compiled cells by source: a snippet evaluated again (a poll, a grader
# running the same check) skips parsing and compiling.
_compiled = {}
_COMPILED_MAX = 256


def _compile_cell(code):
    global _cells
    cached = _compiled.get(code)
    if cached is not None:
        return cached
    _cells += 1
    filename = f"<cell {_cells}>"
    # Tracebacks and SyntaxErrors show the cell's lines.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
    compiled = (compile(tree, filename, "exec"), last)
    if len(_compiled) >= _COMPILED_MAX:
        _compiled.pop(next(iter(_compiled)))
    _compiled[code] = compiled
    return compiled


def _cell(code):
    body, last = _compile_cell(code)
    exec(body, _namespace)
    if last is not None:
        return eval(last, _namespace)
    return None


def _lookup(name):
    head, _, rest = name.partition(".")
    if head in _namespace:
        target = _namespace[head]
    elif hasattr(builtins, head):
        target = getattr(builtins, head)
    else:
        raise NameError(f"name '{head}' is not defined in the session")
    for part in rest.split(".") if rest else ():
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"'{name}' is a {type(target).__qualname__}, not a function")
    return target


def _load(filename, source):
    """Runs a file's code in the session under its own name (`malt call
    --python FILE.py`), so that its tracebacks name the file."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), _namespace)


_namespace["__malt_load__"] = _load


class WitWorld(wit_world.WitWorld):
    def eval(self, code: str) -> bytes:
        _begin()
        try:
            value = _cell(code)
        except BaseException as error:  # noqa: BLE001 (KeyboardInterrupt too)
            raise Err(_traceback(error)) from None
        finally:
            _finish()
        return _encode(value)

    def call(self, name: str, args: bytes) -> bytes:
        _begin()
        try:
            arguments = _msgpack.unpackb(args)
            function = _lookup(name)
            value = function(*arguments)
        except BaseException as error:  # noqa: BLE001
            raise Err(_traceback(error)) from None
        finally:
            _finish()
        return _encode(value)
