"""The architecture contracts of pyproject.toml ([tool.importlinter]) hold: the kernels import
nothing of the pipeline, the bench suite is imported by nothing but the CLI, srel_fast has no
import cycle. `lint-imports` from the repository root checks the same."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(cwd):
    """`lint-imports` on the srel_fast and kernels packages found from ``cwd``, with this checkout's contracts."""
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--config", os.path.join(ROOT, "pyproject.toml")],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def test_a_broken_contract_fails(tmp_path):
    for name in ("srel_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with open(tmp_path / "kernels" / "_backend.py", "a") as f:
        f.write("\nfrom srel_fast import recover  # noqa: E402,F401 - a kernel importing the pipeline\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "the kernels import nothing of the pipeline BROKEN" in r.stdout
    assert "kernels._backend -> srel_fast.recover" in r.stdout
