"""Real `dvc repro` of the pipeline in a temporary copy of the repository (fixtures in conftest.py), and each
stage's code dependencies in dvc.yaml checked against the code the stage runs."""

import ast
import json
import shlex
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from weather_restore.cli import build_parser
from weather_restore.data.records import WEATHERS
from weather_restore.models import MODEL_NAMES, build_model

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "weather_restore"

# --- the files of the package a stage runs, read from the code ------------------------------------------------


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def package_imports(nodes: list[ast.AST]) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The package's import statements within `nodes`: (name -> ("module", M) | ("symbol", M, attr), modules)."""
    bindings: dict[str, tuple[str, ...]] = {}
    loads: set[str] = set()
    for node in (sub for top in nodes for sub in ast.walk(top)):
        if isinstance(node, ast.Import):
            for alias in (a for a in node.names if a.name.split(".")[0] == PACKAGE):
                loads.add(alias.name)
                bindings[alias.asname or PACKAGE] = ("module", alias.name if alias.asname else PACKAGE)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            loads.add(node.module)
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if module_file(submodule):
                    loads.add(submodule)
                bindings[alias.asname or alias.name] = (
                    ("module", submodule) if module_file(submodule) else ("symbol", node.module, alias.name)
                )
    return bindings, loads


class ModuleCode:
    """A module's top-level definitions, the code that runs when it is imported, and what that code imports."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.defs: dict[str, ast.AST] = {}
        self.on_import: list[ast.AST] = []
        for stmt in ast.parse(module_file(name).read_text()).body:
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
                continue
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.defs[stmt.name] = stmt
                self.on_import.extend(stmt.decorator_list)
                if isinstance(stmt, ast.ClassDef):  # bases and class attributes run on import, methods when called
                    self.on_import.extend(stmt.bases)
                    self.on_import.extend(s for s in stmt.body if not isinstance(s, ast.FunctionDef))
            else:
                self.on_import.append(stmt)
        self.bindings, self.loads = package_imports(self.on_import)


class StageCode:
    """The package's files a stage's command runs, read from the code (no stage is run).

    `must`: what it loads on any path: the import-time closure of the entry point's module and of the imports
    that open the subcommand's handler. `may`: every file it can run: imports inside functions are followed
    through every function the handler can reach by name. Two branches are read from the command line: the CLI
    runs only the handler of the stage's subcommand, and `build_model(name)` imports only the module of the model
    the stage names with `--model`.
    """

    def __init__(self, cmd: str) -> None:
        args = shlex.split(cmd)
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        self.entry_module, entry = scripts[args[0]].split(":")
        handler = build_parser()[1][args[1]]
        self.handler = (handler.__module__, handler.__name__)
        model = args[args.index("--model") + 1] if "--model" in args else None
        self.skipped = {f"{PACKAGE}.models.{name}" for name in MODEL_NAMES if model and name != model}
        self.code: dict[str, ModuleCode] = {}
        self.loaded: set[str] = set()
        self.reached: set[tuple[str, str]] = set()

        opening = []
        for stmt in self.module(self.handler[0]).defs[self.handler[1]].body:
            if not isinstance(stmt, ast.Import | ast.ImportFrom | ast.Expr):  # the docstring is an Expr
                break
            opening.append(stmt)
        self.must = self._import_closure({self.entry_module, *package_imports(opening)[1]})
        self.load(self.entry_module)
        self.reach(self.entry_module, entry)
        self.reach(*self.handler)
        self.may = {self.file(name) for name in self.loaded}

    def file(self, module: str) -> str:
        return module_file(module).relative_to(REPO).as_posix()

    def module(self, name: str) -> ModuleCode:
        if name not in self.code:
            self.code[name] = ModuleCode(name)
        return self.code[name]

    def _import_closure(self, names: set[str]) -> set[str]:
        done: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            parts = name.split(".")
            for prefix in (".".join(parts[: i + 1]) for i in range(len(parts))):
                if prefix not in done:
                    done.add(prefix)
                    todo.extend(self.module(prefix).loads)
        return {self.file(name) for name in done}

    def load(self, name: str) -> None:
        """Import `name`: its parent packages, then its import-time code."""
        if name in self.loaded or name in self.skipped:
            return
        parts = name.split(".")
        for i in range(1, len(parts)):
            self.load(".".join(parts[:i]))
        self.loaded.add(name)
        code = self.module(name)
        for target in code.loads:
            self.load(target)
        for node in code.on_import:
            self.follow(code, {}, node)

    def reach(self, module: str, name: str) -> None:
        """Call (or use) the top-level function or class `name` of `module`."""
        if (module, name) in self.reached or module in self.skipped:
            return
        if module == self.entry_module and name.startswith("cmd_") and (module, name) != self.handler:
            return  # another subcommand's handler: registered in the parser, never called by this stage
        code = self.module(module)
        if name not in code.defs:
            return
        self.load(module)
        self.reached.add((module, name))
        bindings, loads = package_imports([code.defs[name]])
        for target in loads:
            self.load(target)
        self.follow(code, bindings, code.defs[name])

    def follow(self, code: ModuleCode, local: dict[str, tuple[str, ...]], node: ast.AST) -> None:
        """Reach every function or class `node` names, directly or as `module.name`."""
        bases = {id(sub.value) for sub in ast.walk(node) if isinstance(sub, ast.Attribute)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                self.resolve(code, local, sub.value.id, sub.attr)
            elif isinstance(sub, ast.Name) and id(sub) not in bases:
                self.resolve(code, local, sub.id, None)

    def resolve(self, code: ModuleCode, local: dict[str, tuple[str, ...]], name: str, attr: str | None) -> None:
        target = local.get(name) or code.bindings.get(name)
        if target is None:
            self.reach(code.name, name)
        elif target[0] == "symbol":
            self.symbol(target[1], target[2])
        elif attr is None:  # a module passed around whole: any of its functions may run
            for each in list(self.module(target[1]).defs):
                self.reach(target[1], each)
        elif module_file(f"{target[1]}.{attr}"):
            self.load(f"{target[1]}.{attr}")
        else:
            self.symbol(target[1], attr)

    def symbol(self, module: str, name: str) -> None:
        """`from module import name`: a function or class of it, or a name it imports in turn."""
        if module in self.skipped:
            return
        code = self.module(module)
        if name in code.defs:
            self.reach(module, name)
        elif (target := code.bindings.get(name)) is not None and target != ("symbol", module, name):
            if target[0] == "symbol":
                self.symbol(target[1], target[2])
            else:
                self.load(target[1])


def pipeline_stages(root: Path = REPO) -> dict[str, dict]:
    """dvc.yaml's stages by name, `foreach` expanded (`train@dwgn`)."""
    stages = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            template = yaml.safe_dump(stage["do"])
            for item in stage["foreach"]:
                stages[f"{name}@{item}"] = yaml.safe_load(template.replace("${item}", item))
        else:
            stages[name] = stage
    return stages


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage.get("deps", []) if dep.startswith(f"src/{PACKAGE}/")}


@pytest.mark.parametrize("name", sorted(pipeline_stages()))
def test_each_stage_depends_on_the_code_it_runs_and_no_other(name):
    stage = pipeline_stages()[name]
    code = StageCode(stage["cmd"])
    listed = code_deps(stage)
    missing, unused = sorted(code.must - listed), sorted(listed - code.may)
    assert not missing, f"{name} always runs these files, which dvc.yaml does not list"
    assert not unused, f"{name} can never run these files, which dvc.yaml lists"
    assert all((REPO / dep).is_file() for dep in listed)


# --- the files of the package a stage loads, seen in a real run -------------------------------------------------


def files_loaded_by_stage(log: Path, stages: dict[str, dict]) -> dict[str, set[str]]:
    """The package's files each stage's command imported, by the command line each log records."""
    by_args = {tuple(shlex.split(stage["cmd"])[1:]): name for name, stage in stages.items()}
    loaded: dict[str, set[str]] = defaultdict(set)
    for path in log.glob("*.log"):
        argv, *modules = path.read_text().splitlines()
        if (name := by_args.get(tuple(argv.split("\0")[1:]))) is not None:
            loaded[name] |= {module_file(m).relative_to(REPO).as_posix() for m in modules if module_file(m)}
    return loaded


# One appended comment in each file, and the stages `dvc status` must then call changed: exactly these.
EDITS = {
    # train validates with restore_clip (inference.py).
    "src/weather_restore/inference.py": {
        "train@dynstaticnet", "train@dwgn", "evaluate@dynstaticnet", "evaluate@dwgn", "compare",
    },
    "src/weather_restore/evaluate.py": {"evaluate@dynstaticnet", "evaluate@dwgn", "compare"},
    "src/weather_restore/metrics.py": {
        "train@dynstaticnet", "train@dwgn", "evaluate@dynstaticnet", "evaluate@dwgn",
        "export@dynstaticnet", "export@dwgn", "compare",
    },
    "src/weather_restore/models/dwgn.py": {"train@dwgn", "evaluate@dwgn", "export@dwgn"},
}  # fmt: skip
# Code of no stage (the loaders and windows of `restore`, the registry): edited all at once, one `dvc status` that
# names no stage clears each of them.
NO_STAGE_CODE = ("src/weather_restore/windows.py", "src/weather_restore/restore.py", "src/weather_restore/registry.py")


def stages_changed_by_editing(root: Path, run, *paths: str) -> dict[str, list]:
    """`dvc status --json` after appending a comment to each of `paths` (put back afterwards): stage -> its changes."""
    originals = {path: (root / path).read_bytes() for path in paths}
    for path, original in originals.items():
        (root / path).write_bytes(original + b"\n# an edit that changes nothing the code does\n")
    try:
        return json.loads(run(["dvc", "status", "--json"], root))
    finally:
        for path, original in originals.items():
            (root / path).write_bytes(original)


@pytest.mark.slow
def test_data_stages_run_then_second_repro_is_a_no_op(tiny_pipeline, built_tiny_repo, run):
    for stage in ("assemble", "split"):
        assert f"Running stage '{stage}'" in tiny_pipeline.output
    manifest = json.loads((built_tiny_repo / "data/mwvd/manifest.json").read_text())
    for split, count in (("train", 2), ("test", 1)):
        for weather in WEATHERS:
            assert sum(c["split"] == split and c["weather"] == weather for c in manifest["clips"]) == count
    train = {c["source_video"] for c in manifest["clips"] if c["split"] == "train"}
    test = {c["source_video"] for c in manifest["clips"] if c["split"] == "test"}
    assert train and test and not train & test
    first = (built_tiny_repo / "data/mwvd/manifest.json").read_bytes()

    again = run(["dvc", "repro", "split"], built_tiny_repo)
    assert "didn't change, skipping" in again and "Running stage" not in again
    assert "up to date" in run(["dvc", "status", "split"], built_tiny_repo).lower()
    assert (built_tiny_repo / "data/mwvd/manifest.json").read_bytes() == first


@pytest.mark.slow
def test_a_data_stage_rerun_on_the_same_inputs_leaves_the_stages_after_it_up_to_date(built_tiny_repo, run):
    """The outputs are functions of their inputs (the tool's output markers carry no time stamp), so DVC hashes them
    alike: forcing assemble again, seconds after the build, changes nothing that split or training depend on."""
    before = (built_tiny_repo / "dvc.lock").read_text()
    out = run(["dvc", "repro", "--force", "--single-item", "assemble"], built_tiny_repo)
    assert "Running stage 'assemble'" in out
    assert json.loads(run(["dvc", "status", "--json"], built_tiny_repo)) == {}
    assert (built_tiny_repo / "dvc.lock").read_text() == before


@pytest.mark.slow
def test_changing_clip_params_reruns_only_split(built_tiny_repo, run):
    params = yaml.safe_load((built_tiny_repo / "params.yaml").read_text())
    params["data"]["clips"]["seed"] = 7
    (built_tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "split"], built_tiny_repo)
    assert "Running stage 'split'" in out
    assert "Running stage 'assemble'" not in out


def parameter_count(model: str, config: dict) -> int:
    return sum(p.numel() for p in build_model(model, **config).parameters())


@pytest.mark.slow
def test_whole_pipeline_trains_evaluates_and_exports_both_models_then_is_a_no_op(
    tiny_pipeline, built_tiny_repo, run, exportable_models
):
    from mlflow import MlflowClient

    root = built_tiny_repo
    for model in ("dynstaticnet", "dwgn"):
        for stage in ("train", "evaluate", "export"):
            assert f"Running stage '{stage}@{model}'" in tiny_pipeline.output
        export = json.loads((root / "reports" / model / "export.json").read_text())
        assert export["max_abs_diff"] <= 1e-4 and (root / "models" / model / "model.onnx").is_file()
        metrics = json.loads((root / "reports" / model / "metrics.json").read_text())
        assert set(metrics["per_weather"]) == set(WEATHERS)
        assert metrics["overall"]["lpips"] is None
        assert metrics["params"] == parameter_count(model, exportable_models[model])
        assert (root / "reports" / model / "samples.png").is_file()
        run_info = json.loads((root / "models" / model / "run.json").read_text())
        tracked = MlflowClient(run_info["tracking_uri"]).get_run(run_info["run_id"])
        assert run_info["tracking_uri"] == f"sqlite:///{root.resolve()}/mlflow.db"
        assert tracked.info.status == "FINISHED"
        assert tracked.data.metrics["test_psnr"] == pytest.approx(metrics["overall"]["psnr"])
    assert "| dynstaticnet | overall |" in (root / "reports" / "compare.md").read_text()

    stages = pipeline_stages(root)
    loaded = files_loaded_by_stage(tiny_pipeline.imports, stages)
    assert set(loaded) == set(stages), "every stage ran and imported the package"
    for name, stage in stages.items():
        assert not sorted(loaded[name] - code_deps(stage)), f"{name} imported files dvc.yaml does not list"

    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again
    for path, expected in EDITS.items():
        changed = stages_changed_by_editing(root, run, path)
        assert set(changed) == expected, path
        assert all(changes == [{"changed deps": {path: "modified"}}] for changes in changed.values()), path
    assert stages_changed_by_editing(root, run, *NO_STAGE_CODE) == {}
    assert json.loads(run(["dvc", "status", "--json"], root)) == {}

    # A DwGN training setting is a parameter of DwGN's training and card, of no DynStaticNet stage. (That DVC then
    # reruns DwGN's training, evaluation, export and card, the comparison and nothing else is tests/test_flows.py's
    # check of the same edit, run by the flow: a second retraining here would only repeat it.)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["training"]["dwgn"]["iterations"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = {"changed deps": {"params.yaml": {"training.dwgn": "modified"}}}
    assert json.loads(run(["dvc", "status", "--json"], root)) == {"train@dwgn": [changed], "card@dwgn": [changed]}
