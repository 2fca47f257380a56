"""Build hook: generate the protobuf code into pathways_lite/v1/ before packaging it."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self):
        script = Path(__file__).resolve().parent / "protos" / "generate.py"
        subprocess.check_call([sys.executable, str(script)])
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
