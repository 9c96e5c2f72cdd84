import subprocess
import sys


def test_doctor_attaches_every_program_and_says_all_good():
    done = subprocess.run([sys.executable, "-m", "ksift", "doctor"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for hook in ("tp_btf/sched_process_fork", "tp_btf/sched_process_exec", "tp_btf/sched_process_exit"):
        assert f"[ ok ]   {hook}" in done.stdout
    assert "ring buffer: BPF_MAP_TYPE_RINGBUF supported" in done.stdout
    assert "all good" in done.stdout
