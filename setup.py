"""Build step: the wheel carries a copy of the top-level profiles/ (hardware and cluster YAML) as
kdplan/_profiles, so an installed kdplan knows its clusters. profiles/ stays the one place people
edit them; kdplan.profiles.profiles_dir() reads the checkout's copy when there is one."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProfiles(build_py):
    def run(self):
        super().run()
        src = ROOT / "profiles"
        if src.is_dir():  # absent only when building from an sdist that already holds the copy
            dst = Path(self.build_lib) / "kdplan" / "_profiles"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithProfiles})
