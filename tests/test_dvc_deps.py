"""Every DVC stage declares what its output is made from, derived from the code itself.

For each stage in dvc.yaml (as DVC renders it, templating included), starting at the module
its `cmd` runs (`python -m stages.<name>`):
- the project modules it imports, followed through every `import` in stages/ and flows/
  (lazy imports inside functions included), must each be a dep, or lie in a folder that is;
- the params keys it reads (`params.<section>.<key>`, through aliases such as `g = params.grpo`
  and arguments annotated with a section class such as `g: GGUFParams`) must each be covered
  by the stage's `params` list (`grpo` covers `grpo.beta`). A section passed whole to a function
  (`dataset_name(params.prepare)`) counts where that function reads it, through its annotated
  parameter; any other use of a whole section (`params.grpo.model_dump()`) reads all of it.

Reads are counted per module-level function or class, for the functions some module of the stage
mentions (a module holding both `sft_kwargs` and `grpo_kwargs` does not make sft read grpo).
Three modules are left out: stages/common/params.py (validation of the whole file and
check_runtime's early refusals) and stages/common/tracking.py (which params to log to MLflow, the
experiment name) do not shape the outputs; stages/common/checkpoints.py dumps the whole params but
keeps exactly the keys the stage declares in dvc.yaml. All three are still deps where imported.
The package's __init__ and stages/common/errors.py (how a process says why it failed) are not.
stages/launch.py, which places a stage's processes, is left out the same way: of what it reads,
only launch.num_processes (the global batch) and launch.config (the engine) change what is
trained, and the last test checks that the stages it runs declare those two.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from stages.common.params import Params

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "flows")
RECORD_KEEPING = {"stages/common/params.py", "stages/common/tracking.py", "stages/common/checkpoints.py",
                  "stages/launch.py"}
# How a process reports the way it ended (stages/__init__.py installs the error classifier): it
# shapes no output, so neither it nor what it imports is a dep (a stage that imports those
# modules itself, as grpo does vllm_server, still needs them).
PROCESS_PLUMBING = {"stages", "stages.common.errors"}


# ------------------------------------------------------------------ dvc.yaml, as DVC reads it
@cache
def dvc_stages() -> dict[str, dict]:
    """{stage: {"cmd", "deps": [paths], "params": [keys]}} rendered by DVC's own loader."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        out = {}
        for stage in repo.index.stages:
            deps, params = [], []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    params += list(dep.params)
                else:
                    deps.append(Path(dep.fs_path).resolve().relative_to(ROOT).as_posix())
            out[stage.addressing] = {"cmd": stage.cmd, "deps": deps, "params": params}
    return out


# ------------------------------------------------------------------ imports
def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not a project module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(file: Path) -> set[str]:
    """Dotted names of the project modules one file imports (any depth, any scope)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from stages.common import models` imports the module stages.common.models
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i]))}
    return found


def is_empty_package(file: Path) -> bool:
    """An __init__.py holding at most a docstring: importing it runs nothing."""
    body = ast.parse(file.read_text()).body
    return file.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                              for n in body)


@cache
def import_closure(module: str) -> frozenset[Path]:
    """Files of `module` and every project module it imports, transitively."""
    seen: set[str] = set()
    todo = [m for m in imported_modules(module_file(module))] + [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in PROCESS_PLUMBING:
            todo += imported_modules(module_file(name)) - seen
    files = {module_file(m) for m in seen - PROCESS_PLUMBING}
    return frozenset(f for f in files if not is_empty_package(f))


# ------------------------------------------------------------------ params reads
def _sections(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, str]:
    """Section class name -> its dotted path in params.yaml (e.g. GGUFParams -> gguf)."""
    out = {}
    for key, field in model.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out[inner.__name__] = prefix + key
            out |= _sections(inner, prefix + key + ".")
    return out


SECTION_PATHS = {"Params": "", **_sections()}


def _schema_at(path: str) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for key in filter(None, path.split(".")):
        annotation = model.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _extend(path: str, attrs: list[str]) -> str:
    """The longest params key that `<path>.<attrs...>` names; methods and properties stop it."""
    for attr in attrs:
        model = _schema_at(path)
        if model is None or attr not in model.model_fields:
            break
        path = f"{path}.{attr}" if path else attr
    return path


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """`a.b.c` -> ("a", ["b", "c"]); None for anything not rooted at a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def _bound(value: ast.AST, bindings: dict[str, str]) -> str | None:
    chain = _chain(value)
    if chain and chain[0] in bindings:
        path = _extend(bindings[chain[0]], chain[1])
        if _schema_at(path) is not None:
            return path
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "load_params":
        return ""
    return None


def _own_nodes(func: ast.AST):
    """Nodes of a function body, not descending into nested functions or classes' methods."""
    todo = list(ast.iter_child_nodes(func))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo += list(ast.iter_child_nodes(node))


def _scope_reads(scope: ast.AST, inherited: dict[str, str]) -> set[str]:
    bindings = dict(inherited)
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for arg in scope.args.args + scope.args.kwonlyargs + scope.args.posonlyargs:
            annotation = ast.unparse(arg.annotation) if arg.annotation else None
            if annotation in SECTION_PATHS:
                bindings[arg.arg] = SECTION_PATHS[annotation]
            elif arg.arg == "params":
                bindings[arg.arg] = ""
    nodes = list(_own_nodes(scope))
    aliased = set()  # `params.grpo` in `g = params.grpo` reads nothing yet; g's uses do
    for node in nodes:  # aliases: g = params.grpo; p, fmt = params.prepare, AnswerFormat(...)
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) \
                else [(target, value)]
            for name, bound_to in pairs:
                path = _bound(bound_to, bindings)
                if isinstance(name, ast.Name) and path is not None:
                    bindings[name.id] = path
                    aliased.add(id(bound_to))
    reads = set()
    for node in nodes:
        if isinstance(node, ast.Attribute) and id(node) not in aliased \
                and not isinstance(getattr(node, "_parent", None), ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in bindings:
                key = _extend(bindings[chain[0]], chain[1])
                whole_section = key == ".".join(filter(None, [bindings[chain[0]], *chain[1]])) \
                    and _schema_at(key) is not None
                parent = getattr(node, "_parent", None)
                passed_on = isinstance(parent, ast.keyword) or (isinstance(parent, ast.Call) and parent.func is not node)
                if not (whole_section and passed_on):
                    reads.add(key)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            reads |= _scope_reads(node, bindings)
    return reads


@cache
def _tree(file: Path) -> ast.Module:
    tree = ast.parse(file.read_text())
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            child._parent = parent
    return tree


@cache
def params_read_by_unit(file: Path) -> dict[str | None, frozenset[str]]:
    """Params keys read by each module-level function or class (by name), and by the module's own
    statements (None)."""
    tree = _tree(file)
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    units = {None: frozenset(_scope_reads(ast.Module([n for n in tree.body if not isinstance(n, defs)], []), {}))}
    for node in tree.body:
        if isinstance(node, defs):
            units[node.name] = frozenset(_scope_reads(node, {}))
    return units


def params_read(file: Path) -> frozenset[str]:
    """Params keys one module reads ("" would be the whole of params.yaml)."""
    return frozenset().union(*params_read_by_unit(file).values())


@cache
def names_used(file: Path) -> frozenset[str]:
    """Every name and attribute a module mentions: what it may call."""
    return frozenset(n.id if isinstance(n, ast.Name) else n.attr
                     for n in ast.walk(_tree(file)) if isinstance(n, (ast.Name, ast.Attribute)))


def covered(key: str, declared: list[str], sep: str = ".") -> bool:
    """key is declared itself or lies under a declared key (params: `grpo` covers `grpo.beta`;
    paths with sep="/": `stages/eval_task` covers `stages/eval_task/utils.py`)."""
    return any(key == d or key.startswith(d + sep) for d in declared)


# ------------------------------------------------------------------ the tests
def stage_files(cmd: str) -> frozenset[Path]:
    """The import closure of what a stage command runs: `python -m <module>`, or the launcher
    `python -m stages.launch <stage>` together with the stage module it hands on (stages.<stage>)."""
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage command {cmd!r} is not `python -m <module>`"
    modules = [words[2]] + ([f"stages.{words[3]}"] if words[2] == "stages.launch" else [])
    return frozenset().union(*(import_closure(m) for m in modules))


STAGES = sorted(dvc_stages())


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_every_project_module_it_imports(stage):
    spec = dvc_stages()[stage]
    files = stage_files(spec["cmd"])
    missing = sorted(f.relative_to(ROOT).as_posix() for f in files
                     if not covered(f.relative_to(ROOT).as_posix(), spec["deps"], sep="/"))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them under deps"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_every_params_key_it_reads(stage):
    spec = dvc_stages()[stage]
    files = stage_files(spec["cmd"])
    used = frozenset().union(*(names_used(f) for f in files))
    reads = {}
    for file in files:
        rel = file.relative_to(ROOT).as_posix()
        if rel in RECORD_KEEPING:
            continue
        for unit, keys in params_read_by_unit(file).items():
            if unit is None or unit in used:  # a function no module of the stage mentions is never run
                for key in keys:
                    reads.setdefault(key, set()).add(f"{rel}:{unit or '<module>'}")
    if "" in reads:  # the whole of params.yaml: every section
        for section in Params.model_fields:
            reads.setdefault(section, set()).update(reads[""])
        del reads[""]
    missing = {key: sorted(where) for key, where in sorted(reads.items()) if not covered(key, spec["params"])}
    assert not missing, f"dvc.yaml stage {stage!r} reads params it does not declare: {missing}"


def test_the_scan_finds_reads_through_aliases_and_annotations(tmp_path):
    """The derivation itself, on a module written for it: a read it misses would pass silently."""
    module = tmp_path / "probe.py"
    module.write_text(
        "def run(params, g: GGUFParams):\n"
        "    m, fmt = params.model, None\n"
        "    x = params.project.answer_format.model_dump()\n"
        "    def inner():\n"
        "        return m.lora.r + g.n_ctx\n"
        "    describe(params.prepare, section=params.evaluate)\n"
        "    return params.grpo.effective_generation_batch_size, m.trust_remote_code\n")
    assert params_read(module) == {"project.answer_format", "model.lora.r", "gguf.n_ctx", "grpo",
                                   "model.trust_remote_code"}


@pytest.mark.slow
def test_editing_a_data_file_in_place_reruns_prepare(tmp_path):
    """Issue 13: a file named in params (prepare.train_file) is a dep by content, through real DVC."""
    import json
    import os
    import subprocess
    import sys

    from stages.preset import render
    from tests.conftest import tiny
    from tests.test_flows import copy_repo

    repo = copy_repo(tmp_path / "repo")
    lines = (ROOT / "data/gsm8k/train.jsonl").read_text().splitlines(keepends=True)
    data = repo / "mydata"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(lines[:120]))
    (data / "test.jsonl").write_text("".join(lines[200:230]))
    (repo / "params.yaml").write_text(render(tiny({"prepare": {
        "source": "file", "train_file": "mydata/train.jsonl", "test_file": "mydata/test.jsonl",
        "sft_examples": 10, "max_train_rows": None}})))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PIPELINE_MLRUNS_DIR": str(tmp_path / "mlruns")}

    def dvc(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    def prepared_rows() -> int:
        return json.loads((repo / "metrics/prepare.json").read_text())["rows_in_train"]

    assert "Running stage 'prepare'" in dvc("repro", "prepare")
    assert prepared_rows() == 120
    assert json.loads((repo / "metrics/prepare.json").read_text())["dataset"] == \
        "file:mydata/train.jsonl+mydata/test.jsonl"
    assert "didn't change" in dvc("repro", "prepare")

    (data / "train.jsonl").write_text("".join(lines[:70]))  # the same path, new content
    assert "mydata/train.jsonl" in dvc("status", "prepare")
    assert "Running stage 'prepare'" in dvc("repro", "prepare")
    assert prepared_rows() == 70


def test_stages_run_through_the_launcher_declare_what_changes_their_result():
    launched = {stage: spec for stage, spec in dvc_stages().items() if spec["cmd"].split()[2] == "stages.launch"}
    assert set(launched) == {"sft", "grpo"}
    for stage, spec in launched.items():
        assert {"launch.num_processes", "launch.config"} <= set(spec["params"]), stage
