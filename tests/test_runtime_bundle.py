"""The runtime shipped into remote sessions (Kaggle, Colab) is complete: every in-session
module imports from the extracted archive alone, not from the installed gpupool."""

from __future__ import annotations

import ast
import subprocess
import sys
import tarfile
from pathlib import Path

import gpupool.session
from gpupool.bundle import pack_runtime, runtime_sources

PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import gpupool.manifest, gpupool.runtime, gpupool.torch
import gpupool.session.bootstrap, gpupool.session.contract, gpupool.session.inputs, gpupool.session.snapshot
for module in (gpupool.session.bootstrap, gpupool.session.contract, gpupool.session.inputs,
               gpupool.session.snapshot, gpupool.runtime, gpupool.manifest, gpupool.torch):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
print("ok", gpupool.torch.save_training_state.__module__)
"""


def test_shipped_runtime_imports_every_session_module(tmp_path: Path) -> None:
    archive = tmp_path / "runtime.tar.gz"
    pack_runtime(archive)
    target = tmp_path / "runtime"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(target, filter="data")
    assert "gpupool/torch/__init__.py" in names
    result = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok gpupool.torch")


def test_example_resumed_from_its_final_checkpoint_completes(tmp_path: Path) -> None:
    """A session cut after the last checkpoint but before complete() resumes at the last step:
    the example must finish (exit 0), not fail on a loss it never computed."""
    import os

    from gpupool.manifest import list_local
    from tests.helpers import EXAMPLE, ROOT, TINY_ENV

    def run(session: Path, restore: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **TINY_ENV, "TOTAL_STEPS": "3", "GPUPOOL_SESSION_DIR": str(session),
               "PYTHONPATH": str(ROOT)}
        env.pop("GPUPOOL_DEADLINE", None)
        if restore is not None:
            env["GPUPOOL_RESTORE_DIR"] = str(restore)
        return subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, env=env, capture_output=True,
                              text=True, timeout=300)

    first = run(tmp_path / "first")
    assert first.returncode == 0, first.stderr
    final = tmp_path / "first" / "checkpoints" / list_local(tmp_path / "first" / "checkpoints")[0].name
    again = run(tmp_path / "again", restore=final)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 3" in again.stdout


# -- the session side imports the standard library only ---------------------------------------

# The files of the archive that must run on a bare Python: the session subpackage, the public
# runtime, and the gpupool modules these import (checked by the same walk). torch/ and
# integrations/ import their framework on purpose and are left out.
STDLIB_ONLY = ("gpupool/__init__.py", "gpupool/runtime.py", "gpupool/clock.py", "gpupool/manifest.py",
               "gpupool/errors.py")


def foreign_imports(sources: dict[str, bytes]) -> list[str]:
    """``file: module`` for each import in ``sources`` (``gpupool/<path>`` -> bytes) of neither
    the standard library nor one of ``sources`` itself; every import counts, at the top or
    inside a function. From a package, only its modules in ``sources`` may be imported."""
    modules = {n.removesuffix(".py").replace("/", "."): n for n in sources}
    packages = {m.removesuffix(".__init__") for m in modules if m.endswith(".__init__")}
    shipped = {m.removesuffix(".__init__") for m in modules}
    found = []
    for name, data in sorted(sources.items()):
        for node in ast.walk(ast.parse(data, filename=name)):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                package = node.module in packages
                wanted = [f"{node.module}.{a.name}" for a in node.names] if package else [node.module]
            else:
                continue
            found += [f"{name}: {module}" for module in wanted
                      if module.split(".")[0] not in sys.stdlib_module_names and module not in shipped]
    return found


def session_side() -> dict[str, bytes]:
    shipped = runtime_sources()
    return {name: data for name, data in shipped.items()
            if name.startswith("gpupool/session/") or name in STDLIB_ONLY}


def test_the_session_side_imports_only_the_standard_library() -> None:
    sources = session_side()
    assert "gpupool/session/contract.py" in sources and "gpupool/session/bootstrap.py" in sources
    assert foreign_imports(sources) == []


def test_the_import_check_sees_a_foreign_import() -> None:
    sources = {**session_side(), "gpupool/session/extra.py": (
        b"import json\nfrom gpupool.session import contract\n"
        b"def later():\n    import yaml\n    from gpupool.spec import ExperimentSpec\n")}
    assert foreign_imports(sources) == ["gpupool/session/extra.py: yaml",
                                        "gpupool/session/extra.py: gpupool.spec"]


def test_the_session_subpackage_ships_whole() -> None:
    """A module added to gpupool/session/ ships without a change to the bundle."""
    package = Path(gpupool.session.__file__).parent
    on_disk = {f"gpupool/session/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    shipped = {name for name in runtime_sources() if name.startswith("gpupool/session/")}
    assert on_disk == shipped and "gpupool/session/snapshot.py" in shipped
