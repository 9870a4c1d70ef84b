"""bench/gpu_check.sh --dry-run: the one-call GPU script runs all its steps at tiny sizes on the CPU."""
import os
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-3000:]
    for step in ("install", "env", "kernels", "tests", "convnet", "cli", "r18", "r50"):
        assert f"[{step}] ok" in summary, summary
    assert "kernel check:" in r.stdout and "FAILED" not in r.stdout
    assert "CLI recovery:" in r.stdout
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    for want in ("gpu_check/kernels/kernel_check.json", "gpu_check/kernels/kernel_time.json", "gpu_check/cli.log",
                 "gpu_check/cli_manifest.json", "gpu_check/bench/recover_step_convnet4-64_small_cpu.json"):
        assert want in names, names
    assert not any(n.startswith("gpu_check/cli_out") for n in names), names  # no images: keeps the pack small


def test_gpu_check_budget_skips_steps(tmp_path):
    # a spent budget skips the remaining steps instead of overrunning the caller's limit
    out = tmp_path / "out"
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--budget", "20",
                        "--steps", "env,r50"], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                       capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert "[r50] skipped: budget spent" in summary or "[r50] TIMED OUT" in summary, summary
    assert r.returncode in (0, 1)
