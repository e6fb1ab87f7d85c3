"""Render the notebook of one Colab attempt (nbformat).

Cells: instructions, a ``parameters`` cell (papermill's convention: tests inject the emulator's
URL and a test token after it), the agent's source (standard library only: the session
contract, ``gpupool.session.contract``, then the Drive client and the agent), then one cell per
step: GPU check, install + restore, train, release the runtime. The notebook carries no
credential of the user's machine: on Colab it signs in as the person who runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpupool.session import contract

# The contract first: the agent uses its names before gpupool's runtime is downloaded.
AGENT_SOURCES = [Path(contract.__file__), Path(__file__).with_name("agent_drive.py"),
                 Path(__file__).with_name("agent.py")]
DRIVE_BASE_URL = "https://www.googleapis.com"
PARAMETER_DEFAULTS = {
    "DRIVE_BASE_URL": DRIVE_BASE_URL,
    "DRIVE_TOKEN": None,  # None: sign in through google.colab.auth
    "WORK_DIR": "/content/gpupool",
    "RELEASE_RUNTIME": True,
}

INSTRUCTIONS = """\
# gpupool: experiment `{experiment}`, attempt `{attempt}`

1. **Runtime → Change runtime type → GPU** (T4 is fine).
2. **Runtime → Run all**, and allow Drive access when asked.

This notebook trains only this experiment: it restores the latest checkpoint, trains until the
run is done or the session nears Colab's limit, and saves checkpoints, heartbeats and status to
your Drive folder `{folder}`. gpupool picks it up from there and resumes the run elsewhere when
this session ends. You can close the tab once training runs; keep the runtime connected.
"""


def render(params: dict[str, Any], *, experiment: str) -> Any:
    """The notebook as an ``nbformat`` node; ``params`` become the parameters cell."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    values = {**PARAMETER_DEFAULTS, **params}
    parameters = new_code_cell("# Parameters (gpupool)\n" + "".join(
        f"{name} = {value!r}\n" for name, value in values.items()))
    parameters.metadata["tags"] = ["parameters"]
    collect = "P = {" + ", ".join(f"{name!r}: {name}" for name in values) + "}\n"
    cells = [
        new_markdown_cell(INSTRUCTIONS.format(experiment=experiment, attempt=values["ATTEMPT_ID"],
                                              folder=values.get("FOLDER_TITLE", "gpupool"))),
        parameters,
        new_code_cell("# gpupool's session agent (standard library only)\n"
                      + "\n\n".join(p.read_text(encoding="utf-8") for p in AGENT_SOURCES)),
        new_code_cell("# 1. GPU check, and sign in to Drive as you\n" + collect
                      + "drive, reporter, work = connect(P)\ncheck_gpu(P, reporter)\n"),
        new_code_cell("# 2. Install gpupool's runtime and your code; restore the checkpoint\n"
                      "config = install(drive, reporter, P, work)\n"),
        new_code_cell("# 3. Train until done or the session deadline; checkpoints go to Drive\n"
                      "ended = train(drive, reporter, P, work, config)\n"),
        new_code_cell("# 4. Give the GPU back\nif RELEASE_RUNTIME:\n    release_runtime()\n"),
    ]
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4", "name": f"gpupool-{experiment}"},
    })
    nbformat.validate(notebook)
    return notebook


def dumps(notebook: Any) -> bytes:
    import nbformat

    return nbformat.writes(notebook).encode("utf-8")
