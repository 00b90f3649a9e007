"""The wheel on its own: built, installed into a fresh virtual environment, run from there.

A plain `pip install` must carry the migrations and SQL views inside the package, so this runs the
installed console script against a new SQLite file, away from the source tree.

Dependencies: with ACTION_METRICS_WHEEL_TEST_INDEX=1 (CI, a machine online) pip installs them
from the package index, as a user's machine would. Otherwise, so the suite runs offline, the fresh
environment borrows the third-party packages of the environment running the tests through a `.pth`
line, added after the wheel is installed; that environment's own copy of action-metrics is never
imported (the test checks where the package was loaded from).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FROM_INDEX = os.environ.get("ACTION_METRICS_WHEEL_TEST_INDEX") == "1"


def run(
    *command: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )
    return result


def clean_environment() -> dict[str, str]:
    """No PYTHONPATH (it would put the source tree first) and no action-metrics settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith("ACTION_METRICS_") and not key.startswith("PIP_")
    }


@pytest.mark.slow
def test_the_wheel_installs_and_runs_in_a_fresh_environment(tmp_path: Path) -> None:
    built = run(
        sys.executable,
        "-m",
        "build",
        "--wheel",
        "--no-isolation",
        "--outdir",
        tmp_path / "dist",
        ROOT,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("action_metrics-*.whl")

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    environment = clean_environment()
    if FROM_INDEX:
        installed = run(python, "-m", "pip", "install", f"{wheel}[server]", cwd=tmp_path, env=environment)
    else:
        installed = run(
            python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path, env=environment
        )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    if not FROM_INDEX:
        probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        fresh_site = Path(run(python, "-c", probe, cwd=tmp_path, env=environment).stdout.strip())
        borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (fresh_site / "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")

    located = run(
        python,
        "-c",
        "import action_metrics, action_metrics.migrate as m; "
        "print(action_metrics.__file__); print(m.migrations_dir()); print(m.sql_dir())",
        cwd=tmp_path,
        env=environment,
    )
    assert located.returncode == 0, located.stderr
    for path in located.stdout.split():
        assert Path(path).resolve().is_relative_to(venv.resolve()), located.stdout

    script = venv / "bin" / "action-metrics"
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgraded = run(script, "db", "upgrade", "--url", url, cwd=tmp_path, env=environment)
    assert upgraded.returncode == 0, upgraded.stderr
    demo = run(script, "demo", "--url", url, "--size", "120", "--days", "1", cwd=tmp_path, env=environment)
    assert demo.returncode == 0, demo.stderr
    assert "Which model is being used most?" in demo.stdout
    table = run(script, "report", "--url", url, cwd=tmp_path, env=environment)
    assert table.returncode == 0, table.stderr
    assert "By model" in table.stdout
    document = json.loads(run(script, "report", "--url", url, "--json", cwd=tmp_path, env=environment).stdout)
    assert document["metrics"]["count"] == 120
    refused = run(script, "serve", "--url", url, cwd=tmp_path, env=environment)
    assert refused.returncode == 1
    assert "ACTION_METRICS_API_TOKEN" in refused.stderr
