"""Ship the top-level ``conf/`` folder inside the wheel as ``armodal/conf`` (all metadata is in pyproject.toml).

In a checkout, armodal reads ``conf/`` directly (see armodal/utils/config.py); an installed
package reads the copy made here, so ``pip install .`` then ``armodal-train`` works anywhere.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "conf"
        dst = Path(self.build_lib) / "armodal" / "conf"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})
