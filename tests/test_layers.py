"""The package's layering rule (setup.cfg, [importlinter]) holds, and is able to fail."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter import cli; "
                           f"sys.exit(cli.lint_imports(config_filename={str(ROOT / 'setup.cfg')!r},"
                           " no_cache=True))"],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=300)


def test_layers_kept():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "mc_jax", tmp_path / "mc_jax", ignore=shutil.ignore_patterns(
        "assets", "__pycache__"))
    tree = tmp_path / "mc_jax" / "core" / "tree.py"
    tree.write_text(tree.read_text() + "\nfrom mc_jax.runtime import session  # upward\n")
    r = lint(tmp_path)
    assert r.returncode != 0
    assert "mc_jax.core.tree -> mc_jax.runtime.session" in r.stdout, r.stdout
