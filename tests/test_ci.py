"""CI runs exactly the README's test command, after starting its services."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running the tests", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().splitlines()
    assert script[-1] == command
    assert "GPUPOOL_TEST_POSTGRES_URL" in "\n".join(script)  # the PostgreSQL params really run


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """pyproject lists packages by hand (providers/ imports as gpupool_providers), so a new
    subpackage missing from the list would be left out of an installed gpupool."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    renamed = {folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for top in ("gpupool", "providers"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join((renamed.get(parts[0], parts[0]), *parts[1:])))
    assert found == set(setuptools["packages"])
