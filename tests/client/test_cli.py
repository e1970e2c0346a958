"""The `igd` command line, as a user runs it."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def test_version_is_the_installed_package_version() -> None:
    script = Path(sys.executable).parent / "igd"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout == f"igd {version('igd')}\n"
