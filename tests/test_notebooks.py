"""Executes every notebooks/*.ipynb top to bottom; a cell that raises fails its test.

The kernel is pinned to this interpreter: the test writes a kernel spec whose argv starts with
`sys.executable` (the venv's python) into a temporary folder, and a KernelSpecManager that looks
only there. A `python3` kernel spec installed elsewhere on the machine (user or system Jupyter
folders) can therefore not swap in another Python. The spec sets JAX_PLATFORMS=cpu, and the kernel
runs in a temporary working directory so notebooks cannot write into the repository.
"""

import json
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "diffusax-test"
CELL_TIMEOUT_S = 300  # per cell; a notebook is meant to run in well under a minute on CPU


def pinned_kernel_manager(spec_root: Path) -> KernelManager:
    """A kernel manager that can only start `sys.executable -m ipykernel_launcher`."""
    spec_dir = spec_root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "diffusax test kernel",
        "language": "python",
        "env": {"JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": "0"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    command = manager.format_kernel_cmd()
    assert command[0] == sys.executable, command
    return manager


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        f"{path.name} is saved with outputs; clear them before committing"
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        notebook,
        km=pinned_kernel_manager(tmp_path / "jupyter"),
        timeout=CELL_TIMEOUT_S,
        extra_arguments=["--InteractiveShell.colors=nocolor"],  # plain tracebacks in failures
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} raised in a cell:\n{error}")
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
