"""The package's layers: no module imports a layer above its own, there are no import cycles, and
TensorFlow and torch stay in the modules that own them."""

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'macrl_jax'
# Lowest first; a module may import its own layer and those before it. The base modules (errors,
# sharding) are below every layer.
LAYERS = ('base', 'models', 'config', 'data', 'interop', 'methods', 'evals', 'run')


def modules() -> dict[str, pathlib.Path]:
  """'macrl_jax.run.train' → its file, for every module of the package."""
  out = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def layer(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else 'base'


def imports(path: pathlib.Path, known) -> list[tuple[str, int, bool]]:
  """(module, line, at module level) for each import of the package in `path`, lazy ones too."""
  tree = ast.parse(path.read_text())
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('macrl_jax'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        out.append((full if full in known else node.module, node.lineno, id(node) in top))
    elif isinstance(node, ast.Import):
      out += [(a.name, node.lineno, id(node) in top) for a in node.names
              if a.name.startswith('macrl_jax')]
  return out


def third_party(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split('.')[0])
    elif isinstance(node, ast.Import):
      names |= {a.name.split('.')[0] for a in node.names}
  return names


def test_the_layers_are_the_folders():
  found = {layer(m) for m in modules()}
  assert found == set(LAYERS), found


def against_the_order(known: dict) -> list[str]:
  """Every import of a layer above the importing module's, as 'file:line imports module'."""
  against = []
  for module, path in known.items():
    mine = LAYERS.index(layer(module))
    for imported, line, _ in imports(path, known):
      if LAYERS.index(layer(imported)) > mine:
        against.append(f'{path.name}:{line} imports {imported}')
  return against


def test_no_module_imports_a_layer_above_its_own():
  against = against_the_order(modules())
  assert not against, '\n'.join(against)


def test_the_order_check_reports_an_import_from_above(tmp_path):
  """A models module that imports run (even lazily, inside a function) is reported; one that
  imports errors is not."""
  (tmp_path / 'vit.py').write_text('from macrl_jax import errors\n\n'
                                   'def f():\n  from macrl_jax.run import train\n')
  known = dict(modules(), **{'macrl_jax.models.vit': tmp_path / 'vit.py'})
  assert against_the_order(known) == ['vit.py:4 imports macrl_jax.run.train']


def test_no_import_cycles():
  known = modules()
  graph = collections.defaultdict(set)
  for module, path in known.items():
    graph[module] |= {m for m, _, top in imports(path, known) if top and m != module}
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        cycles.append(' → '.join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for module in sorted(known):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles


def test_tensorflow_and_torch_stay_where_they_belong():
  owners = {'tensorflow': 'data', 'tensorflow_datasets': 'data'}
  misplaced = []
  for module, path in modules().items():
    used = third_party(path)
    for lib, home in owners.items():
      if lib in used and layer(module) != home:
        misplaced.append(f'{module} imports {lib}')
    torch_like = used & {'torch', 'timm', 'safetensors'}
    if torch_like and module != 'macrl_jax.interop.torch_files':
      misplaced.append(f'{module} imports {sorted(torch_like)}')
  assert not misplaced, misplaced


def test_only_the_tools_module_defines_flags():
  """absl flags belong to main.py and the tools: in the package only run/tool_io.py defines them,
  inside the function that the tools call."""
  defining = sorted(m for m, path in modules().items() if 'flags.DEFINE_' in path.read_text())
  assert defining == ['macrl_jax.run.tool_io'], defining
