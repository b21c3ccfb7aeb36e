"""The codebase's shape: no import cycle among the project's modules, and the entry points stay wiring."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# scripts/ and benchmarks/ put their own folder on sys.path
SCRIPT_DIRS = ('scripts', 'benchmarks')


def project_modules(root):
    """{dotted name: file} of the modules an import can reach: top-level files, packages, scripts."""
    mods = {}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.endswith('.py'):
            mods[name[:-3]] = path
        elif os.path.isfile(os.path.join(path, '__init__.py')) or name in SCRIPT_DIRS:
            for sub in os.listdir(path):
                if sub.endswith('.py'):
                    mod = name if sub == '__init__.py' else f'{name}.{sub[:-3]}'
                    mods[mod] = os.path.join(path, sub)
    return mods


def imports_of(name, path, mods):
    """The project modules `name` imports, at module level or inside functions (both can close a cycle)."""
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    folder = os.path.basename(os.path.dirname(path))
    found = set()

    def resolve(target):
        for cand in (target, f'{folder}.{target}'):  # a script's sibling is imported by its bare name
            if cand in mods:
                return cand
        return None

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(p for p in parts + [base] if p)
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f'{base}.{a.name}' if resolve(f'{base}.{a.name}') else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and not resolve(t):
                t = t.rpartition('.')[0]  # `import a.b.c` of a name inside a.b
            if t and resolve(t) != name:
                found.add(resolve(t))
    return found


def find_cycle(root):
    """One import cycle as a list of modules (first == last), or None."""
    mods = project_modules(root)
    graph = {m: sorted(imports_of(m, p, mods)) for m, p in mods.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 'open':
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        state[m] = 'done'
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_the_projects_modules():
    cycle = find_cycle(ROOT)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_cycle_finder_sees_function_level_and_package_imports(tmp_path):
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / '__init__.py').write_text('')
    (tmp_path / 'pkg' / 'a.py').write_text('from pkg.b import g\n')
    (tmp_path / 'pkg' / 'b.py').write_text('def g():\n    from . import c\n')
    (tmp_path / 'pkg' / 'c.py').write_text('import top\n')
    (tmp_path / 'top.py').write_text('import os\n')
    assert find_cycle(str(tmp_path)) is None
    (tmp_path / 'top.py').write_text('def f():\n    from pkg import a\n')
    assert find_cycle(str(tmp_path)) == ['pkg.a', 'pkg.b', 'pkg.c', 'top', 'pkg.a']



@pytest.mark.parametrize('entry', ['main.py', 'main_pretrain.py'])
def test_entry_points_stay_wiring(entry):
    path = os.path.join(ROOT, entry)
    text = open(path).read()
    lines = text.count('\n') + (not text.endswith('\n'))
    assert lines <= 500, f'{entry} has {lines} lines (at most 500): move run machinery to runner/'
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(text))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    name = max(sizes, key=sizes.get)
    assert sizes[name] <= 80, f'{entry}: {name} has {sizes[name]} lines (at most 80)'
