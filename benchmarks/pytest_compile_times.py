"""A pytest plugin: per test, its wall and CPU time and the XLA programs it compiled, with seconds.

  PYTHONPATH=benchmarks COMPILE_TIMES_DIR=/tmp/ct JAX_COMPILATION_CACHE_DIR=/tmp/fresh_cache \
      python -m pytest -q -n 2 --dist loadgroup -m "not slow" -p pytest_compile_times tests

Writes COMPILE_TIMES_DIR/<xdist worker>.json: {test id: {start, wall, cpu, programs: [[name, hash of
the program text, seconds], ...]}}; a program compiled by two tests or workers shows under both
with the same hash. `cpu` is user + system seconds of the test process and of the subprocesses the
test waited for (on two cores, what the suite's wall time follows). Counts compilations in the test
processes, not in their subprocesses. It wraps jax._src.compiler.backend_compile_and_load, a
private function of the pinned jax.
"""

import hashlib
import json
import os
import time

import pytest

_OUT = os.environ.get('COMPILE_TIMES_DIR', '/tmp/compile_times')
_WORKER = os.environ.get('PYTEST_XDIST_WORKER', 'main')
_per_test = {}
_compiled = []


def _record_compilations():
  from jax._src import compiler  # noqa: PLC0415 (after conftest has set XLA_FLAGS)
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  compile_and_load = compiler.backend_compile_and_load

  def recorded(backend, module, *args, **kwargs):
    start = time.perf_counter()
    executable = compile_and_load(backend, module, *args, **kwargs)
    name = ir.StringAttr(module.operation.attributes['sym_name']).value
    text = module.operation.get_asm(enable_debug_info=False)
    _compiled.append([name, hashlib.sha1(text.encode()).hexdigest()[:10],
                      round(time.perf_counter() - start, 2)])
    return executable

  compiler.backend_compile_and_load = recorded


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def pytest_sessionstart(session):
  del session
  os.makedirs(_OUT, exist_ok=True)
  _record_compilations()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _compiled.clear()
  start, cpu = time.time(), _cpu_seconds()
  yield
  _per_test[item.nodeid] = dict(start=round(start, 1), wall=round(time.time() - start, 1),
                                cpu=round(_cpu_seconds() - cpu, 1), programs=list(_compiled))
  with open(os.path.join(_OUT, f'{_WORKER}.json'), 'w') as f:
    json.dump(_per_test, f, indent=0)
