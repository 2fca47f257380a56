"""Build hook: generate the protobuf code into pathways_lite/v1/ before setuptools looks for it.

Generation runs whenever setup.py runs (metadata, editable install, wheel), because setuptools
checks that the pathways_lite.v1 package directory exists before any build command.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup

_script = Path(__file__).resolve().parent / "protos" / "generate.py"
subprocess.check_call([sys.executable, str(_script), "--if-stale"])

setup()
