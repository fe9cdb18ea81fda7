"""Puts the top-level experiments/ and search_spaces/ into the wheel as blendtune/_shipped/ (blendtune.shipped
finds them there after a non-editable install; in a checkout it reads the top-level folders themselves)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("experiments", "search_spaces")


class BuildWithShipped(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders
            return
        for name in SHIPPED:
            target = Path(self.build_lib) / "blendtune" / "_shipped" / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for src in sorted(Path(__file__).parent.joinpath(name).glob("*.yaml")):
                shutil.copy2(src, target / src.name)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            for name in SHIPPED:
                target = Path(self.build_lib) / "blendtune" / "_shipped" / name
                outputs += [str(target / src.name) for src in Path(__file__).parent.joinpath(name).glob("*.yaml")]
        return outputs


setup(cmdclass={"build_py": BuildWithShipped})
