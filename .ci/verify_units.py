"""CI check: ``systemd-analyze verify`` accepts the unit files in systemd/ without a warning about them.

Run by .ci/run, which installs Debian's ``systemd`` package for ``systemd-analyze`` where it is missing.
(Not part of the pytest suite, so that the README's test command needs nothing beyond its install.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
VENV_PYTHON = "/opt/esrfarm/venv/bin/python"


def main() -> int:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        print("verify_units: systemd-analyze is missing (apt-get install -y systemd)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # verify checks that ExecStart's program exists: point it at this interpreter instead of the venv's.
        for unit in UNITS.iterdir():
            if unit.suffix in {".service", ".target"}:
                (work / unit.name).write_text(unit.read_text().replace(VENV_PYTHON, sys.executable))
        targets = [
            work / "esrfarm-worker@0.service",
            work / "esrfarm-worker@3.service",
            work / "esrfarm-workers.target",
            work / "esrfarm-service.service",
        ]
        result = subprocess.run(
            [analyze, "verify", *map(str, targets)], capture_output=True, text=True, timeout=120
        )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "esrfarm" in line]
    if result.returncode != 0 or ours:
        print(
            f"verify_units: systemd-analyze verify failed:\n{result.stderr}{result.stdout}", file=sys.stderr
        )
        return 1
    print("verify_units: systemd-analyze verify accepts", ", ".join(t.name for t in targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
