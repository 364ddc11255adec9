"""What malt offers Python code running in a worker.

    import malt
    malt.interrupted()          # True once the manager asked to interrupt
    malt.sleep(0.5)             # KeyboardInterrupt if interrupted meanwhile
    malt.channel_put("jobs", {"id": 1})
    malt.channel_take("jobs")   # blocks; KeyboardInterrupt if interrupted
    malt.channel_is_ready("jobs")
    malt.env("NAME")            # a variable the manager granted, or None
"""

import os

from componentize_py_types import Err
from wit_world.imports import host

import _msgpack

__all__ = ["interrupted", "sleep", "channel_put", "channel_take", "channel_is_ready", "env"]


def interrupted():
    """True once the manager asked to interrupt the running request."""
    return host.interrupted()


def sleep(seconds):
    """Sleeps; an interrupt cuts it short with KeyboardInterrupt."""
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    if not host.sleep(int(seconds * 1000)):
        raise KeyboardInterrupt


# True while the guest's memory interrupt is armed (see guest.py): an
# interrupt may land as KeyboardInterrupt in Python code at any moment.
_armed = False


def _lifted(call, *args):
    """Calls a host import whose answer is a result: componentize-py builds
    it with Python constructors, where an exception landing would trap the
    instance. So it runs disarmed; re-armed after, an interrupt that came
    meanwhile lands here, in the caller's code."""
    if not _armed:
        return call(*args)
    host.arm_memory_interrupt(False)
    try:
        return call(*args)
    finally:
        host.arm_memory_interrupt(True)


def _failed(error):
    if host.interrupted():
        raise KeyboardInterrupt from None
    raise RuntimeError(error.value) from None


def channel_put(name, value):
    """Appends a value to the worker channel `name` (blocks while full)."""
    data = _msgpack.packb(value)
    try:
        _lifted(host.channel_put, name, data)
    except Err as e:
        _failed(e)


def channel_take(name):
    """Removes and returns the oldest value of channel `name` (blocks)."""
    try:
        data = _lifted(host.channel_take, name)
    except Err as e:
        _failed(e)
    return _msgpack.unpackb(data)


def channel_is_ready(name):
    """Whether channel_take(name) would not block."""
    return host.channel_is_ready(name)


def env(name):
    """The environment variable `name` the manager granted, or None."""
    return os.environ.get(name)
