"""The Python guest of malt: a notebook-like session behind the
`malt:worker` world.

`eval` runs code in one persistent namespace; the value of a trailing
expression is the result (as in Jupyter), None otherwise. `call` calls a
function defined earlier. Values cross as MessagePack. Errors are Python
tracebacks of the user's frames. A cooperative interrupt raises
KeyboardInterrupt in running code: the host writes it into CPython's
thread state as its asynchronous exception (see `_use_memory_interrupt`);
`time.sleep`, `malt.sleep` and `malt.channel_take` raise it themselves.
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
    global _started, _memory_interrupt, interrupts
    _started = True
    random.seed()
    # The manager's python_path directories, searched before the rest.
    extra = [p for p in os.environ.get("MALT_PYTHON_PATH", "").split(":") if p]
    sys.path[:0] = extra
    stdlib = os.environ.get("MALT_PYTHON_STDLIB")
    if stdlib:
        sys.path.append(stdlib)
    refused = _use_memory_interrupt()
    _memory_interrupt = refused is None
    if _memory_interrupt:
        interrupts = "memory"
    else:
        interrupts = f"polling ({refused})"
        _monitoring.set_events(_TOOL, _JUMP)


# -- interrupts ---------------------------------------------------------------

# How interrupts reach running code: "memory", or "polling (why not memory)".
interrupts = None
_memory_interrupt = False

# The interrupt as CPython's own asynchronous exception: the host stores
# KeyboardInterrupt in the thread state's `async_exc` and sets the
# asynchronous-exception bit of its eval breaker, which the interpreter
# checks on every loop jump and call anyway. The exception lands where the
# code runs, so its own `try` catches it, and costs nothing until then.
# The layout of CPython 3.14.0 in componentize-py 0.25.1 (wasm32): the
# runtime state is static; in it the empty tuple, then the main interpreter
# and, inside that, the main thread's state. The host checks that the
# thread state is where this says before it accepts.
_INTERP_FROM_EMPTY_TUPLE = 0x38
_TSTATE_FROM_INTERP = 0x1C020
_INTERP = 8  # offsetof(PyThreadState, interp)
_EVAL_BREAKER = 12  # offsetof(PyThreadState, eval_breaker)
_RECURSION_LIMIT = 36  # offsetof(PyThreadState, py_recursion_limit)
_ASYNC_EXC = 88  # offsetof(PyThreadState, async_exc)
_ASYNC_EXCEPTION_BIT = 1 << 3
_MARK = 987_654_321


def _use_memory_interrupt():
    """None if the host raises interrupts in this interpreter's memory
    from now on, else why not."""
    if sys.implementation.name != "cpython" or sys.version_info[:3] != (3, 14, 0):
        return f"no thread-state layout known for {sys.version.split()[0]}"
    if sys.maxsize != 2**31 - 1:
        return "not a 32-bit interpreter"
    interp = id(()) + _INTERP_FROM_EMPTY_TUPLE
    tstate = interp + _TSTATE_FROM_INTERP
    at = host.MemoryInterrupt(
        word=tstate + _EVAL_BREAKER,
        bits=_ASYNC_EXCEPTION_BIT,
        slot=tstate + _ASYNC_EXC,
        value=id(KeyboardInterrupt),  # a static type: never freed
    )
    probe = os.urandom(16)
    limit = sys.getrecursionlimit()
    # A limit nothing else has marks the thread state for the host's check.
    sys.setrecursionlimit(_MARK)
    try:
        checks = [
            (tstate + _INTERP, interp),
            (tstate + _RECURSION_LIMIT, _MARK),
            (tstate + _ASYNC_EXC, 0),
        ]
        # A bytes object's data starts 16 bytes in (wasm32).
        host.use_memory_interrupt(at, probe, id(probe) + 16, checks)
        return None
    except Err as e:
        return e.value
    finally:
        sys.setrecursionlimit(limit)


def _run(work, *args):
    """Runs the user's part of a request: (True, value) or (False, error).
    An interrupt raised in memory lands in the user's code or in these
    lines, never after them: they disarm it before they return."""
    if not _memory_interrupt:
        try:
            return True, work(*args)
        except BaseException as error:  # noqa: BLE001 (KeyboardInterrupt too)
            return False, error
    try:
        host.arm_memory_interrupt(True)
        malt._armed = True
        try:
            outcome = True, work(*args)
        except BaseException as error:  # noqa: BLE001
            outcome = False, error
        malt._armed = False
        host.arm_memory_interrupt(False)
    except KeyboardInterrupt as error:
        # It landed between the lines above; there is no second one.
        malt._armed = False
        host.arm_memory_interrupt(False)
        outcome = False, error
    return outcome


# Without the memory interrupt: every 1000 loop jumps, ask the host. An
# exception raised by a JUMP callback escapes the `try` around the loop
# (CPython 3.12-3.14), one raised by a LINE callback does not: so an
# interrupt turns on LINE events and the next line raises KeyboardInterrupt
# where the user's code can catch it. A loop on one line has no next line:
# 1000 jumps later the JUMP callback raises it itself (the cell ends; the
# namespace is intact).
_monitoring = sys.monitoring
_TOOL = 4
_JUMP = _monitoring.events.JUMP
_LINE = _monitoring.events.LINE
_CHECK_EVERY = 1000
_jumps = 0
_pending = False


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


# Registered now, turned on at the first request if the memory interrupt
# is refused.
_monitoring.use_tool_id(_TOOL, "malt")
_monitoring.register_callback(_TOOL, _JUMP, _on_jump)
_monitoring.register_callback(_TOOL, _LINE, _on_line)

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


def _warm():
    """Called in a spare worker made ahead (an in-process worker's), before
    its worker gets it: the start, and a cell through the parser, compiler
    and evaluator, so that the worker's first request finds them warm. It
    leaves no trace in the session: no cell counted, cached or defined."""
    code = "_warm = [n * 2 for n in range(3)]\n_warm[-1]"
    exec(compile(ast.parse(code, "<warm>", "exec"), "<warm>", "exec"), {})


_namespace["__malt_warm__"] = _warm


def _answer(work, *args):
    """One request: the user's part, its output flushed, its value or the
    traceback of what went wrong."""
    _begin()
    try:
        ok, value = _run(work, *args)
    finally:
        _finish()
    if not ok:
        raise Err(_traceback(value))
    return _encode(value)


def _call(name, args):
    return _lookup(name)(*_msgpack.unpackb(args))


class WitWorld(wit_world.WitWorld):
    def eval(self, code: str) -> bytes:
        return _answer(_cell, code)

    def call(self, name: str, args: bytes) -> bytes:
        return _answer(_call, name, args)
