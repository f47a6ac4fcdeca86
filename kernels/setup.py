"""Lists the `coredi_kernels` subpackages for kernels/pyproject.toml (which holds everything else).

The import name is `coredi_kernels` but the folder is `kernels/`, so setuptools' own discovery would name the
subpackages `attention`, `norm_modulate`, ...: they are found here and prefixed instead, so a new module or
subpackage ships without editing anything.

This folder is the package itself, so nothing of a build may stay in it: the build and egg-info folders go to a
temporary folder (setuptools would otherwise leave `build/` and `coredi_kernels.egg-info/` here, and a module
deleted from the source would live on in `build/lib` and ship in the next wheel), and this script is not copied
into the wheel.
"""
import atexit
import shutil
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PACKAGE = "coredi_kernels"


class build_py_without_setup_script(build_py):
    """build_py that does not ship this script as the module `coredi_kernels.setup`."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != (PACKAGE, "setup")]


if __name__ == "__main__":  # how setuptools runs it; an editable install could also import it as a module
    scratch = tempfile.mkdtemp(prefix="coredi-kernels-build-")
    atexit.register(shutil.rmtree, scratch, True)
    setup(
        packages=[PACKAGE] + [f"{PACKAGE}.{p}" for p in find_packages()],
        cmdclass={"build_py": build_py_without_setup_script},
        options={"build": {"build_base": scratch}, "egg_info": {"egg_base": scratch}},
    )
