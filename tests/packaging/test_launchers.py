"""The launcher scripts' restart and preemption plumbing, run for real with stub `torchrun`, `srun`
and `scontrol` on PATH (no cluster, no torch): what they pass on, and what the SLURM script does
when SLURM's SIGUSR1 arrives."""
import os
import signal
import stat
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stub(bindir, name, body):
    path = os.path.join(bindir, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _env(bindir, **kw):
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", **kw}


def test_torchrun_sh_passes_max_restarts_and_resumes(tmp_path):
    bindir, log = str(tmp_path), str(tmp_path / "log")
    _stub(bindir, "torchrun", f'printf "%s\\n" "$@" > {log}\n')
    script = os.path.join(ROOT, "launchers", "torchrun.sh")
    p = subprocess.run([script, "--nproc", "2", "--max-restarts", "3", "--", "trainer.out_dir=runs/a", "preset=tiny"],
                       env=_env(bindir), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    args = open(log).read().split("\n")
    assert "--max-restarts=3" in args and "--nproc_per_node=2" in args
    assert args[args.index("moesys.train") + 1:] == ["trainer.out_dir=runs/a", "preset=tiny", "trainer.resume=auto", ""]
    # restarts without a fixed out_dir could not resume: refused
    p = subprocess.run([script, "--nproc", "2", "--max-restarts", "1", "--", "preset=tiny"], env=_env(bindir),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--max-restarts 1 needs trainer.out_dir=DIR" in p.stderr
    p = subprocess.run([script, "--max-restarts", "x"], env=_env(bindir), capture_output=True, text=True)
    assert p.returncode == 2 and "--max-restarts must be a whole number >= 0, got 'x'" in p.stderr
    # the default: no restarts
    subprocess.run([script, "--nproc", "2", "--", "preset=tiny"], env=_env(bindir), check=True)
    assert "--max-restarts=0" in open(log).read().split("\n")


def test_slurm_sbatch_asks_for_the_signal_forwards_sigterm_and_requeues(tmp_path):
    script = os.path.join(ROOT, "launchers", "slurm.sbatch")
    text = open(script).read()
    assert "#SBATCH --signal=B:USR1@180" in text and "#SBATCH --requeue" in text
    bindir, log = str(tmp_path), str(tmp_path / "log")
    # srun stands in for the ranks: it records its command, and on SIGTERM "saves" and exits 143
    _stub(bindir, "srun", f'echo "srun $*" >> {log}\nsleep 60 & SP=$!\n'
                          f'trap \'echo "srun got TERM" >> {log}; kill $SP; exit 143\' TERM\nwait $SP\n')
    _stub(bindir, "scontrol", f'if [[ "$1" == show ]]; then echo node0; else echo "scontrol $*" >> {log}; fi\n')
    env = _env(bindir, SLURM_JOB_NODELIST="node0", SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2")
    p = subprocess.Popen(["bash", script, "preset=tiny"], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (os.path.exists(log) and "srun " in open(log).read()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # srun has started, so the trap is set; SRUN_PID is set right after
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 143, (out, err)
    lines = open(log).read().splitlines()
    assert lines[1:] == ["srun got TERM", "scontrol requeue 42"], lines
    assert "--max-restarts=1" in lines[0] and "trainer.out_dir=runs/slurm-42 trainer.resume=auto preset=tiny" in lines[0]
    assert "stopping the ranks at the next step with a checkpoint" in out
