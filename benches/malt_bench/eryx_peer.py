"""The peer of malt's Python guest in malt-bench: pyeryx (eryx: CPython in
wasmtime, in the caller's process), measured the way malt-bench measures
malt. Prints one line of key=value figures. Needs Python >= 3.12 with
`pip install pyeryx`.
"""
import time, os, sys
t = time.perf_counter()
import eryx
s = eryx.Session()
r = s.execute("print(1+1)")
first = time.perf_counter() - t
lat = []
for _ in range(200):
    t = time.perf_counter(); s.execute("x = 1+1"); lat.append(time.perf_counter() - t)
lat.sort()
loop = "t0 = __import__('time').perf_counter()\ntotal = 0\nfor i in range(3_000_000):\n    total += i\nprint(__import__('time').perf_counter() - t0)"
r = s.execute(loop)
loop_s = float(r.stdout.strip()) if hasattr(r, 'stdout') and isinstance(r.stdout, str) else float(r.stdout_text.strip())
starts = []
for _ in range(5):
    t = time.perf_counter(); s2 = eryx.Session(); s2.execute("x = 1"); starts.append(time.perf_counter() - t)
starts.sort()
print(f"first={first:.6f} session={starts[2]:.6f} exec={lat[100]*1e6:.0f}us loop={loop_s:.4f}")
