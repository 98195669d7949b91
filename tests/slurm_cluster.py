"""A real SLURM on this machine for tests: munged, slurmctld and two slurmd (nodes n1 and n2, both on
127.0.0.1, each on its own port), run as root from Debian's packages, every file in one temporary folder.

`cluster` (session-scoped fixture) yields a `Cluster`; the daemons are stopped by PID at teardown. Where
the binaries are absent (or not root) the tests that use it skip, naming the apt-get command."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port

INSTALL = "apt-get update && apt-get install -y slurmctld slurmd slurm-client munge"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
NODES = ("n1", "n2")


def which(name: str) -> str | None:
    """The daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def missing() -> str | None:
    """Why a real SLURM cannot start here, or None."""
    absent = [b for b in BINARIES if which(b) is None]
    if absent:
        return f"real-SLURM tests need {', '.join(absent)}: {INSTALL} (as root)"
    if os.geteuid() != 0:
        return "real-SLURM tests run the daemons as root (slurmd starts jobs as their user)"
    return None


SLURM_CONF = """\
ClusterName=gentraintest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# test pending jobs every 2 s (default 60): a requeued job then starts ~6 s after its requeue
SchedulerParameters=sched_interval=2
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# job ids (and so gentrain.sbatch's rendezvous ports, 20000 + id % 10000) differ from one session to the next
FirstJobId={first_job_id}
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
{nodes}
PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class Cluster:
    """Daemons started in `root`; `env` is what a client (sbatch, scontrol, the tests) needs."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        root = self.root
        for d in ("state", "spool"):
            (root / d).mkdir()
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={free_port()} "
                          f"CPUs={os.cpu_count()} State=UNKNOWN" for n in NODES)
        self.conf.write_text(SLURM_CONF.format(ctld_port=free_port(), root=root, nodes=nodes, names=",".join(NODES),
                                                first_job_id=random.randrange(1000, 9000)))
        key = root / "munge.key"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._daemon("munged", [which("munged"), "--foreground", "--force", f"--socket={root}/munge.socket",
                                f"--key-file={key}", f"--log-file={root}/munged.log",
                                f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"])
        self._wait(lambda: (root / "munge.socket").exists(), "munged's socket", "munged.log")
        self._daemon("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.scontrol("ping").returncode == 0, "slurmctld", "slurmctld.log")
        for n in NODES:
            self._daemon(f"slurmd {n}", [which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self.nodes_idle, "both nodes idle", "slurmctld.log")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name.replace(' ', '.')}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _wait(self, ready, what: str, log: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited: {self._tail(dead[0].replace(' ', '.') + '.out')}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"no {what} after {timeout:.0f} s: {self._tail(log)}")

    def _tail(self, name: str) -> str:
        path = self.root / name
        return path.read_text()[-3000:] if path.exists() else f"({name} absent)"

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env, timeout=30)

    def nodes_idle(self) -> bool:
        out = self.scontrol("show", "node").stdout
        return sorted(re.findall(r"State=(\w+)", out)) == ["IDLE", "IDLE"]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once the job has left slurmctld's memory)."""
        out = self.scontrol("show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def stop(self) -> None:
        """Each daemon by its PID: SIGTERM, then SIGKILL after 20 s; slurmd first, munged last."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=20)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
