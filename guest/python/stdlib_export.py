"""Build time only: writes the standard library beside the Python guest.

`build.sh` (and `malt build-python`) run componentize-py a second time
with this module as the app: while componentize-py pre-initializes it,
the standard library is mounted and the build's directory is writable, so
this copies every module into `stdlib/` with its bytecode. The component
this run makes is thrown away; the guest's own snapshot stays as small as
it was. Workers mount the copy read-only and import from it the modules
their snapshot lacks.
"""

import os
import py_compile
import shutil
import sys

import wit_world

# Not for a sandboxed interpreter without a terminal, threads or sockets,
# or not code at all.
SKIP = {
    "__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo",
    "ensurepip", "lib2to3", "venv", "site-packages", "pydoc_data",
    "lib-dynload", "config-3.14-wasm32-wasi",
}


def export(source, target):
    """Copies each module of `source` to `target` with its bytecode, as an
    unchecked-hash .pyc (the copy is read-only: nothing to check against)."""
    tag = sys.implementation.cache_tag
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        out = os.path.normpath(os.path.join(target, os.path.relpath(root, source)))
        os.makedirs(out, exist_ok=True)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            src = os.path.join(root, name)
            shutil.copyfile(src, os.path.join(out, name))
            try:
                py_compile.compile(
                    src,
                    cfile=os.path.join(out, "__pycache__", f"{name[:-3]}.{tag}.pyc"),
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
            except py_compile.PyCompileError:
                pass  # a module that does not compile does not import either


class WitWorld(wit_world.WitWorld):
    def eval(self, code: str) -> bytes:
        raise NotImplementedError("build time only")

    def call(self, name: str, args: bytes) -> bytes:
        raise NotImplementedError("build time only")


# The build mounts the standard library where sys.path says, not where
# os.__file__ says.
_source = next(p for p in sys.path if os.path.exists(os.path.join(p, "os.py")))
export(_source, os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib"))
