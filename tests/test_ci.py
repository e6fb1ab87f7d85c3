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
