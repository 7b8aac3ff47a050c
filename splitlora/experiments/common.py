"""What the benchmarks share: running CLI processes and measuring them (peak RSS and CPU time per
process from wait4, the machine's other load from /proc/stat), reading metrics, reusing finished runs."""

from __future__ import annotations

import os
import time

def cli() -> list[str]:
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("splitlora")
    return [str(script)] if script.exists() else [sys.executable, "-m", "splitlora.cli"]


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float, log, window_s: float = 3.0, max_busy: float = 0.15) -> float:
    """Wait (at most `max_wait_s`) until the machine is idle: under `max_busy` cores busy over a window.
    Returns the seconds waited (the benchmark goes on regardless; `other_cpu_s` tells what ran)."""
    t0 = time.monotonic()
    while max_wait_s > 0:
        before = busy_cpu_s()
        time.sleep(window_s)
        if (busy_cpu_s() - before) / window_s < max_busy or time.monotonic() - t0 > max_wait_s:
            break
        log(f"bench deploy: the machine is busy; waiting ({time.monotonic() - t0:.0f} s)")
    return time.monotonic() - t0


def cpu_mark() -> tuple[float, float, float]:
    """(machine busy CPU seconds, this process's CPU seconds, monotonic time): taken before spawning."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy_cpu_s(), ru.ru_utime + ru.ru_stime, time.monotonic()


def run_processes(procs: dict, timeout_s: float, tick=None, mark=None, poll_s: float = 0.02) -> dict:
    """Wait for every process of `procs` (name -> Popen, spawned after `mark`), calling `tick()`
    meanwhile; per name, its peak RSS (MiB) and CPU seconds from wait4, so no other process's usage
    is mixed in; `_other_cpu_s`: CPU time of the machine since `mark` not spent by them or by us."""
    import resource

    usage, deadline = {}, time.monotonic() + timeout_s
    busy0, self0, t0 = mark or cpu_mark()
    try:
        while len(usage) < len(procs):
            for name, proc in procs.items():
                if name in usage:
                    continue
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{name} exited with {proc.returncode} (see its log)")
                    peak_file = getattr(proc, "peak_file", None)   # written by the CLI (VmHWM) if asked
                    peak = float(peak_file.read_text()) / 2**20 if peak_file and peak_file.exists() \
                        else ru.ru_maxrss / 1024
                    usage[name] = {"peak_rss_mib": peak, "cpu_s": ru.ru_utime + ru.ru_stime,
                                   "minor_faults": ru.ru_minflt, "involuntary_switches": ru.ru_nivcsw}
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench deploy: {sorted(set(procs) - set(usage))} still running after {timeout_s} s")
            if tick:
                tick()
            time.sleep(poll_s)
    finally:
        for name, proc in procs.items():
            if name not in usage and proc.returncode is None:
                proc.kill()
                proc.wait()
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    ours = sum(u["cpu_s"] for u in usage.values()) + self1.ru_utime + self1.ru_stime - self0
    usage["_elapsed_s"] = time.monotonic() - t0
    usage["_other_cpu_s"] = max(0.0, busy_cpu_s() - busy0 - ours)
    return usage


def metrics(run_dir) -> list[dict]:
    import json
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:   # a line being written
            break
    return out


def train_or_reuse(cfg, run_dir, reuse: bool, log) -> dict:
    """The run's summary: read if `reuse` and run_dir holds a finished run of the same config, else trained."""
    import json

    from .compare import same_config
    from ..train import train

    if reuse and (run_dir / "summary.json").exists() and same_config(run_dir, cfg):
        log(f" (read from {run_dir})")
        return json.loads((run_dir / "summary.json").read_text())
    log("")
    return train(cfg, run_dir, progress=False, overwrite=True)   # the bench's own run directory


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it exec'd: /proc/self/status VmHWM (getrusage's ru_maxrss
    would also count the parent's memory copied at fork, before exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def spawn(root, args: list[str], log_name: str, sets=()):
    """A CLI process (`splitlora ARGS --set ...`) logging to root/log_name; it writes its own peak RSS
    (VmHWM) to `proc.peak_file` at exit (wait4's would count the fork of this process)."""
    import subprocess

    if args[0] == "train":
        args = [*args, "--overwrite"]   # the bench's own run directories
    peak = root / f"{log_name}.peak"
    peak.unlink(missing_ok=True)
    with open(root / log_name, "w") as f:
        proc = subprocess.Popen(cli() + args + [a for item in sets for a in ("--set", item)], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "SPLITLORA_PEAK_RSS_FILE": str(peak)})
    proc.peak_file = peak
    return proc


def server_port(server, log_path, timeout_s: float = 600) -> int:
    """The port a `splitlora serve --address HOST:0` process announced in its log."""
    import re

    deadline = time.monotonic() + timeout_s
    while True:
        m = re.search(r"serving on port (\d+)", log_path.read_text())
        if m:
            return int(m.group(1))
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"bench: the server did not start (see {log_path})")
        time.sleep(0.1)

