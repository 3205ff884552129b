"""What setup.cfg cannot say: the model configs ship inside the package.

The top-level `configs/` folder is their one copy in the source tree; a wheel (and any non-editable
install) carries it as `sfr_cli/configs/*.yaml`, which `sfr_cli.config` looks in first.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["sfr_cli", "sfr_cli.*"]) + ["sfr_cli.configs"],
      package_dir={"sfr_cli.configs": "configs"},
      package_data={"sfr_cli.configs": ["*.yaml"]})
