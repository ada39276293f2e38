"""The one-way layers, read from the source tree (issue 24):

    moesys.kernels  <-  the MoE core (moesys.moe, and the facade moesys/__init__.py)
                    <-  the runtime (moesys.parallel)  <-  the application (every other moesys module)

No module imports a layer above its own, and no function imports a project module to dodge a cycle;
the only lazy project imports allowed load a Triton-only module (one that imports triton at its
top), so a machine without Triton never loads it. Also: importing Hugging Face's `kernels` (as
transformers does) works from the repository root, where our `kernels/` folder sits.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = {"moesys": "moesys", "parallel": "moesys.parallel", "kernels": "moesys.kernels", "configs": "moesys.configs"}
LAYERS = ("kernels", "core", "runtime", "application")


def module_files() -> dict:
    """Dotted module name -> file path, for every module of the four folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(dirpath, f)
    return out


def layer_of(module: str) -> int:
    if module == "moesys.kernels" or module.startswith("moesys.kernels."):
        return 0
    if module in ("moesys", "moesys.moe") or module.startswith("moesys.moe."):
        return 1  # moesys/__init__.py is the core's facade: `from moesys import MoELayer`
    if module == "moesys.parallel" or module.startswith("moesys.parallel."):
        return 2
    return 3


def imports_of(name: str, path: str):
    """(line, target module, inside a function) for every import of a project module in `path`."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            # `from moesys.x import y` may name a submodule y: that module is imported too
            targets += [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "moesys" or t.startswith("moesys."):
                yield node.lineno, t, id(node) in in_function


def imports_triton(path: str) -> bool:
    tree = ast.parse(open(path).read(), path)
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "triton" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "triton":
            return True
    return False


def test_module_discovery_sees_every_layer():
    mods = module_files()
    by_layer = {i: [m for m in mods if layer_of(m) == i] for i in range(4)}
    assert "moesys.moe.layer" in by_layer[1] and "moesys.parallel.runner" in by_layer[2]
    assert "moesys.kernels.grouped_gemm" in by_layer[0] and "moesys.trainer" in by_layer[3]
    assert "moesys.configs.schema" in by_layer[3]
    assert all(len(v) >= 5 for v in by_layer.values()), {k: len(v) for k, v in by_layer.items()}


def test_imports_go_one_way():
    mods = module_files()
    upward = []
    for name, path in sorted(mods.items()):
        for line, target, _ in imports_of(name, path):
            known = target if target in mods else None
            if known is None:
                continue  # `from pkg import name` where name is not a module
            if layer_of(known) > layer_of(name):
                upward.append(f"{os.path.relpath(path, ROOT)}:{line}: {LAYERS[layer_of(name)]} module {name} "
                              f"imports {LAYERS[layer_of(known)]} module {known}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_function_local_imports_of_project_modules():
    mods = module_files()
    local = []
    for name, path in sorted(mods.items()):
        for line, target, in_function in imports_of(name, path):
            if not in_function or target not in mods or name.startswith(target + "."):
                continue  # (a package the module lives in is loaded already: `from . import x` imports x)
            if imports_triton(mods[target]):
                continue  # a Triton-only module, loaded when a Triton kernel is about to run
            local.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {target} inside a function")
    assert not local, "function-local imports of project modules:\n" + "\n".join(local)


def test_the_check_catches_an_upward_import(tmp_path):
    """The scan itself: an import of the runtime from the core is reported (so the tests above can fail)."""
    f = tmp_path / "layer.py"
    f.write_text("def f():\n    from moesys.parallel import apply_expert_parallel\n")
    found = list(imports_of("moesys.moe.layer", str(f)))
    assert found == [(2, "moesys.parallel", True), (2, "moesys.parallel.apply_expert_parallel", True)]
    assert layer_of(found[0][1]) > layer_of("moesys.moe.layer")


def test_huggingface_kernels_imports_from_the_repository_root():
    """A Python started in the repository root imports Hugging Face's `kernels`, not our folder, and
    transformers' modeling files (which import it) load; moesys.kernels is unchanged."""
    pytest.importorskip("kernels")
    pytest.importorskip("transformers")
    code = ("import kernels, moesys.kernels\n"
            "import transformers.models.mixtral.modeling_mixtral\n"
            "print(kernels.__file__)\n"
            "print(moesys.kernels.__file__, moesys.kernels.grouped_gemm.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf, ours = out.stdout.strip().splitlines()[-2:]
    assert hf != os.path.join(ROOT, "kernels", "__init__.py") and "site-packages" in hf, hf
    assert ours == f"{os.path.join(ROOT, 'kernels', '__init__.py')} moesys.kernels.grouped_gemm"


def test_top_level_kernels_without_huggingface_is_not_found():
    """Without Hugging Face's package (no site-packages: python -S), a top-level `import kernels` from
    the repository root fails as if our folder were not there."""
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr


def test_importing_the_apps_does_not_import_the_compiler():
    """`import moesys.train` (every command's and every rank's first cost) leaves torch._dynamo and
    inductor unimported: ~1.1 s of CPU per process that the CLI parent, eval and generate never use
    (a decorator and DTensor's debug module used to pull them in; a training rank still imports
    dynamo when it builds its optimizer, through torch's own code)."""
    code = ("import sys, moesys.train, moesys.evaluate, moesys.generate, moesys.supervise\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(ROOT), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def readme_walk() -> list:
    """(file, function) pairs of the README's "One token through one layer" block."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### One token through one layer", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    pairs = []
    for line in block.strip().splitlines():
        path, names = line.split(": ", 1)
        pairs += [(path, n.strip()) for n in names.split(",")]
    return pairs


def test_the_readme_walk_names_functions_that_exist():
    pairs = readme_walk()
    assert len(pairs) >= 20 and ("moesys/moe/layer.py", "forward") in pairs
    missing = []
    for path, name in pairs:
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            missing.append(f"{path} (no such file)")
            continue
        tree = ast.parse(open(full).read(), full)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name not in defined:
            missing.append(f"{path}: {name}")
    assert not missing, "the README's walk names what is not there:\n" + "\n".join(missing)


def test_no_import_cycles_between_modules():
    """Module-level imports form no cycle (an import of a package the module lives in does not count:
    that package is loaded before the module anyway). Cycles are what function-local imports hid."""
    mods = module_files()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for _, target, in_function in imports_of(name, path):
            if target in mods and target != name and not in_function and not name.startswith(target + "."):
                graph[name].add(target)
    done, on_path, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in done:
            return
        on_path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        on_path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])
