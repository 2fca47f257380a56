"""Install the tools the test suite drives when they are missing and we can: Debian's chromium
for the dashboard's browser test (Playwright's own browser download is not used).

Run by `make test` before pytest. It never fails the build itself: under CI=true the browser
test fails when the browser is still missing, so a missing tool is never a silent skip.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> bool:
    """True when /usr/bin/chromium exists (after installing it with apt-get if we are root)."""
    if os.path.exists(CHROMIUM):
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"ensure_tools: {CHROMIUM} is missing and apt-get cannot run here", file=sys.stderr)
        return False
    print("ensure_tools: installing chromium with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, env=env, check=False)
        if done.returncode != 0:
            print(f"ensure_tools: {' '.join(cmd)} failed ({done.returncode})", file=sys.stderr)
            return False
    return os.path.exists(CHROMIUM)


if __name__ == "__main__":
    ensure_chromium()
