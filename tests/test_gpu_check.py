"""`make gpu-check`'s dry run: the same script on the CPU at tiny sizes, so the one command a lent GPU gets
cannot rot between the sessions that have a GPU. Every part must run and leave its table."""
import re
import subprocess
import sys

from conftest import REPO


def test_the_gpu_check_runs_every_part_on_the_cpu_and_writes_one_markdown_file(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    statuses = dict(re.findall(r"^\| ([^|]+?) \| (ok[^|]*|failed[^|]*|ran out[^|]*) \|$", text, re.M))
    assert set(statuses) == {"tests on the device", "step overhead", "loader throughput", "sweep packing",
                             "Ray Train, 1 worker, against no Ray"}, text
    assert all(s.startswith("ok") for s in statuses.values()), statuses
    for title in statuses:  # each part's own table, not only a status line
        section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        assert "|---|" in section or "passed" in section, (title, section[:500])
    assert "blendtune naive" in text and "Ray Train, 1 worker" in text and "1 CPU per trial" in text
