"""scripts/gpu_check.sh, checked without a GPU: its syntax, its dry run (each step's command and time limit, within
the 8-minute budget) and the flags of every bench and recipe command it will run (run here on tiny CPU shapes)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from dynconv import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
TINY = {"local_filter": "1,2,5,6,3,1", "deform": "1,2,5,4", "dcnv": "1,4,5,2,8", "warp": "1,2,5,6"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _dry_run(tmp_path, *steps, budget=480):
    env = dict(os.environ, DRY="1", OUT=str(tmp_path / "out"), PY="python3", BUDGET=str(budget))
    return subprocess.run(["bash", SCRIPT, *steps], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    proc = _dry_run(tmp_path_factory.mktemp("gpu_check"))
    assert proc.returncode == 0, proc.stderr
    steps = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"== (\w+): limit (\d+)s -> (\S+): (.*)$", line)
        if m:
            steps[m[1]] = (int(m[2]), os.path.basename(m[3]), m[4])
    return steps, proc.stdout


def test_script_syntax():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0


def test_dry_run_fits_eight_minutes_in_at_most_eight_files(dry):
    steps, out = dry
    assert list(steps) == ["setup", "tests", "check_kernels", "local_filter", "deform", "dcnv", "warp", "train"]
    assert sum(limit for limit, _, _ in steps.values()) <= 480
    assert len({file for _, file, _ in steps.values()} | {"tests_console.txt"}) <= 8
    assert steps["train"][0] >= 60  # what is left for training in the worst case
    assert "check-kernels --arch 90" in steps["check_kernels"][2]
    assert "30s per test" in steps["tests"][2]
    assert re.search(r"== dry run: at most (\d+) s of 480", out)


def test_tests_step_splits_existing_files_that_hold_gpu_tests():
    """The tests step runs two heavy files in processes of their own and the rest in a third: the files must exist
    and hold gpu-marked tests (the mark comes from the triton and cuda marks, added at collection)."""
    with open(SCRIPT) as f:
        files = sorted(set(re.findall(r"tests/test_\w+\.py", f.read())))
    assert files == ["tests/test_local_filter.py", "tests/test_warp.py"]
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for file in files:
        ids = [line for line in proc.stdout.splitlines() if line.startswith(file + "::")]
        assert len(ids) >= 20 and any("[triton-" in i for i in ids), (file, ids)
        assert not [i for i in ids if "[torch-" in i]  # the torch parameter of the backend fixture is no GPU test


def test_named_steps_for_later_calls_are_kept(tmp_path):
    named = ["mixture", "mixture_layers", "mixture_layers_odconv", "dcnv_official", "dfn_eval", "dfn"]  # dfn: all left
    proc = _dry_run(tmp_path, *named, budget=10_000)  # each is a call of its own, with its own budget
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0][3:] for line in proc.stdout.splitlines() if " limit " in line] == named


def test_unknown_step_is_refused(tmp_path):
    proc = _dry_run(tmp_path, "setup", "benches")
    assert proc.returncode == 2 and "unknown step benches" in proc.stderr


@pytest.mark.parametrize("name", ["local_filter", "deform", "dcnv", "warp"])
def test_bench_commands_run_here_on_tiny_shapes(dry, name, capsys):
    """The script's bench command line as it stands, on the CPU (Triton in the interpreter) with a tiny shape."""
    argv = shlex.split(dry[0][name][2])
    assert argv[:5] == ["python3", "-m", "dynconv", "bench", name]
    argv = argv[3:]
    assert "float32,bfloat16" in argv and "torch,triton" in argv
    # bf16 in the Triton interpreter costs seconds a kernel: fp32 here (the bf16 rows have tests of their own)
    for flag, value in (("--device", "cpu"), ("--shapes", TINY[name]), ("--repeats", "1"), ("--dtypes", "float32")):
        argv[argv.index(flag) + 1] = value
    assert cli.main(argv + (["--ops", "dcnv4"] if name == "dcnv" else [])) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (") or "| DCNv2" in line]
    assert len(rows) >= 2 and not [r for r in rows if "not run" in r]


def test_train_command_parses(dry, monkeypatch):
    from dynconv.recipes import video_prediction

    monkeypatch.setattr(video_prediction.torch.cuda, "is_available", lambda: True)  # --device cuda is checked
    argv = shlex.split(dry[0]["train"][2])
    assert argv[3:6] == ["train", "video-prediction", "--device"]
    parser = video_prediction.argparse.ArgumentParser()
    video_prediction._add_config_arguments(parser)
    args = parser.parse_args(argv[5:])
    assert args.device == "cuda" and args.time_limit >= 45 and args.test_sequences == 64
