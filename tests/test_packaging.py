"""Packaging: every package folder is listed, and kernels/ installs only as mamba_jax.kernels."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_list_is_complete_and_kernels_are_namespaced():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    assert tool["package-dir"]["mamba_jax.kernels"] == "kernels"
    assert all(p == "mamba_jax" or p.startswith("mamba_jax.") for p in tool["packages"])
    found = {"mamba_jax.kernels"}
    for base, dirs, files in os.walk(os.path.join(ROOT, "mamba_jax")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.add(os.path.relpath(base, ROOT).replace(os.sep, "."))
    assert found == set(tool["packages"])


def test_public_api():
    import mamba_jax
    import mamba_jax.kernels

    assert callable(mamba_jax.ssd) and callable(mamba_jax.ssd_step)
    assert mamba_jax.kernels.__name__ == "mamba_jax.kernels"
