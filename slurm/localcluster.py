"""A real SLURM cluster on localhost: munged, slurmctld and two slurmd "nodes" (n1, n2).

Used by ``tests/slurm`` (session fixture) and usable by hand::

    python slurm/localcluster.py start /tmp/cluster   # prints the SLURM_CONF to export
    python slurm/localcluster.py stop /tmp/cluster

Debian's Slurm 22.05 runs as root without systemd or cgroups. Everything (config, munge key
and socket, spool, state, logs, pid files) lives under one directory; the daemons are children
of this process, started in their own sessions and stopped by pid. Settings that matter:
two ``NodeName`` lines on 127.0.0.1 with different ports (``slurmd -N n1`` / ``-N n2``, ``%n``
in paths), ``cred_expire=10`` (a requeued job restarts after cred_expire+1 s instead of two
minutes), ``KillWait=5``, ``SlurmdParameters=config_overrides`` (nodes may claim more CPUs
than the machine has). Multi-node jobs need ``MASTER_ADDR=127.0.0.1`` (node names do not
resolve); :meth:`LocalCluster.env` sets it.

Standard library only.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin")
                                       if (p := Path(d) / name).is_file()), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_installed(log: Path | None = None) -> str | None:
    """Install Debian's Slurm packages when absent (root only). ``None`` if usable, else why not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm binaries {missing_binaries()} missing and not root (cannot apt-get install)"
    if _which("apt-get") is None:
        return f"Slurm binaries {missing_binaries()} missing and no apt-get"
    out = open(log, "a") if log else subprocess.DEVNULL
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600).returncode != 0:
                return f"{' '.join(cmd)} failed (apt unreachable?)" + (f"; see {log}" if log else "")
    except subprocess.TimeoutExpired:
        return "apt-get timed out"
    finally:
        if log:
            out.close()
    return None if not missing_binaries() else f"still missing after install: {missing_binaries()}"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """Two-node SLURM cluster under ``root``.

    Args:
        root: state directory (created; reused between start/stop).
        nodes: number of slurmd nodes (n1..nN). Default 2.
        cpus_per_node: CPUs each node advertises. Default 2.
    """

    def __init__(self, root: str | Path, nodes: int = 2, cpus_per_node: int = 2):
        self.root = Path(root).resolve()
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._write_config()
        self._start_munge()
        env = self.env()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)], env)
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons (TERM, then KILL), leave the files for post-mortems."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run([_which("scancel"), "--full", "-u", "root"], env=self.env(), capture_output=True, timeout=20)
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self._kill_pidfiles()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and jobs (jobs inherit it through sbatch)."""
        env = dict(os.environ if base is None else base)
        env.update(SLURM_CONF=str(self.conf), MASTER_ADDR="127.0.0.1")
        return env

    # ---------------------------------------------------------------- queries
    def scontrol(self, *args: str) -> str:
        done = subprocess.run([_which("scontrol"), *args], env=self.env(), capture_output=True, text=True, timeout=30)
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (empty when the job is unknown)."""
        text = self.scontrol("show", "job", "-o", str(job_id)).strip()
        return dict(re.findall(r"(?:^|\s)([\w/:]+)=(.*?)(?=\s[\w/:]+=|$)", text))

    def wait_job(self, job_id: str, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                 timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {info.get('JobState')} "
                           f"(logs under {self.root / 'log'})")

    # ---------------------------------------------------------------- internals
    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=compressseg-local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none", "SwitchType=switch/none", "SchedulerType=sched/backfill",
            "SlurmdParameters=config_overrides", "ReturnToService=2",
            "KillWait=5", "MinJobAge=600", "InactiveLimit=0", "JobRequeue=1",
            "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={self.cpus} "
                         "RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--key-file={key}",
                               f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], dict(os.environ))
        deadline = time.monotonic() + 10
        while not (m / "munge.socket").exists():
            if time.monotonic() > deadline or self.procs["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start; see {m / 'munged.log'}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.root / 'log'}")
            done = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env(),
                                  capture_output=True, text=True, timeout=20)
            states = done.stdout.strip()
            if done.returncode == 0 and all(f"{n} idle" in states for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s ({states!r}); see {self.root / 'log'}")

    def _kill_pidfiles(self) -> None:
        # daemons started by an earlier session of `start` (script use) are found by pid file
        for pidfile in [self.root / "slurmctld.pid", *self.root.glob("slurmd-*.pid"), self.root / "munge" / "munged.pid"]:
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python slurm/localcluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = LocalCluster(argv[1])
    if argv[0] == "start":
        reason = ensure_installed()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 1
        cluster.start()  # the daemons run in their own sessions and outlive this script
        print(f"export SLURM_CONF={cluster.conf} MASTER_ADDR=127.0.0.1")
    else:
        cluster._kill_pidfiles()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
