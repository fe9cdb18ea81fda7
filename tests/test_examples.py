"""Every script in examples/ runs as its docstring says (small sizes), and prints what it promises."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import REPO

EXAMPLES = {  # script -> (arguments that keep it small, what its output must show)
    "own_model.py": (["--epochs", "2"], r"ogm_ge: test accuracy fused 0\.\d+.*ogm/coeff/video.*predicts with the "
                                        r"fused head, test accuracy 0\.\d+.*backbone weights loaded"),
    "early_stopping.py": (["--epochs", "6", "--patience", "1"], r"at epoch \d+; best held-out loss at epoch \d+"),
    "variable_length_audio.py": (["--epochs", "1"], r"variable-length audio: test accuracy fused 0\.\d+.*"
                                                    r"predicted classes of 5 test clips: \[\d, \d, \d, \d, \d\]"),
    "own_fusion.py": (["--epochs", "2"], r"bilinear fusion \+ OGM-GE: test accuracy fused 0\.\d+; OGM coefficients"),
    "compare_strategies.py": (["--seeds", "2", "--epochs", "1", "--num-train", "160"],
                              r"\| ogm_ge:alpha=0.8 \| 2 \| 2 \| 1 \|.*\| unimodal:video \| 2 \|.*8 trials"),
    "sweep.py": (["--trials", "2", "--epochs", "1"], r"best held-out accuracy 0\.\d+ with \{.*ogm.alpha"),
}


def test_every_example_is_tested():
    assert {p.name for p in (REPO / "examples").glob("*.py")} - {"my_av.py"} == set(EXAMPLES)


# The default run keeps own_model.py (fit, load, predict, backbone weights); the others run with `make
# test-slow` (the two that start a local Ray take ~17 s each). What each shows is tested in the default run
# by tests/test_python_api.py (early stopping, collate and sampler, own fusion, compare and sweep on objects).
SLOW = {"compare_strategies.py", "sweep.py", "early_stopping.py", "variable_length_audio.py", "own_fusion.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in sorted(EXAMPLES)])
def test_example_runs(script):
    args, expected = EXAMPLES[script]
    # the examples write their runs under TMPDIR: a short one, as Ray's socket paths must stay under 108 bytes
    scratch = tempfile.mkdtemp(prefix="bt-ex-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(REPO / "examples"), "WANDB_MODE": "offline", "TMPDIR": scratch}
    proc = subprocess.run([sys.executable, f"examples/{script}", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(expected, proc.stdout, re.S), proc.stdout[-3000:]
