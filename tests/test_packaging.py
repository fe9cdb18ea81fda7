"""The wheel as a user gets it from `pip install blendtune`: it carries the shipped experiments and search
spaces, and an installed blendtune (not this checkout) trains one by name and finds `--tune`'s spaces."""
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO, TINY

SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "blendtune", "experiments",
           "search_spaces"]

CHECK = """
import sys
from pathlib import Path
import blendtune
site = Path(sys.argv[1]).resolve()
assert Path(blendtune.__file__).resolve().is_relative_to(site), blendtune.__file__
from blendtune.comparisons import default_spaces_dir
from blendtune.search_space import load_search_space
spaces = default_spaces_dir()
assert spaces.is_relative_to(site) and (spaces / "gblend.yaml").is_file(), spaces
assert load_search_space("ogm")  # --space by name
print("installed at", Path(blendtune.__file__).parent)
"""


def test_the_wheel_ships_experiments_and_spaces_and_trains_one_by_name(tmp_path):
    # built from a copy: an in-tree build would leave build/ in the checkout (and race a parallel one)
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_shipped"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("blendtune-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    for name in ("experiments", "search_spaces"):
        shipped = sorted(p.name for p in (REPO / name).glob("*.yaml"))
        assert shipped and all(f"blendtune/_shipped/{name}/{f}" in files for f in shipped), name
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files)

    site = tmp_path / "site"  # the wheel alone; torch, Ray & co. come from this venv
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", site, wheel], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing resolves against its folders
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1", "WANDB_MODE": "offline"}
    check = subprocess.run([sys.executable, "-c", CHECK, site], capture_output=True, text=True, env=env,
                           cwd=elsewhere, timeout=120)
    assert check.returncode == 0, check.stderr

    train = subprocess.run([sys.executable, site / "bin" / "blendtune", "train", "synthetic_naive", *TINY,
                            "train.epochs=1"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert train.returncode == 0, train.stderr
    run_dir = elsewhere / train.stdout.strip().splitlines()[-1]  # runs/... under the cwd
    assert (run_dir / "metrics.jsonl").is_file() and "strategy: naive" in (run_dir / "config.yaml").read_text()


def test_optional_parts_missing_say_which_extra_to_install(tmp_path, monkeypatch, capsys):
    import pytest

    from blendtune import report
    from blendtune.data import video
    from blendtune.errors import UserError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert report._plots(tmp_path, {}, []) is None
    assert "pip install 'blendtune[plots]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    with pytest.raises(UserError, match=r"pip install 'blendtune\[video\]'"):
        video._codec()
