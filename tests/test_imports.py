"""The package's modules import each other without a cycle, function-local imports included."""

import ast

from helpers import REPO

PACKAGE = 'macrl_jax'


def module_name(path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path, modules: set[str]) -> set[str]:
  """The package's modules that `path` imports anywhere in its code."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from macrl_jax import x` names module macrl_jax.x; `from macrl_jax.x import f` names x.
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    found.update(n for n in names if n in modules)
  return found


def import_graph() -> dict[str, set[str]]:
  paths = sorted((REPO / PACKAGE).rglob('*.py'))
  modules = {module_name(p) for p in paths}
  return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_graph_sees_function_local_imports():
  graph = import_graph()
  assert 'macrl_jax.data.input_pipeline' in graph['macrl_jax.run.train']  # imported inside _train


def test_no_import_cycle_in_the_package():
  cycle = find_cycle(import_graph())
  assert cycle is None, ' -> '.join(cycle)
