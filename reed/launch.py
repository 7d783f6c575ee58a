"""Start the processes that ``accelerate launch --cpu --num_processes N`` requests but does not start.

accelerate (1.16) runs several CPU processes only through MPI: without ``--mpirun_hostfile`` its
``--cpu`` launcher starts one process, with ``MASTER_ADDR`` set and no rank. ``reed train`` notices that
case, reads N from the launcher's own command line (the parent process, through ``/proc``, so Linux
only), and starts N copies of itself with the variables ``torch.distributed.run`` would set. accelerate
then gives each copy its rank in a gloo process group, as for ``--multi_gpu`` on a machine without CUDA.
Where N cannot be read, the run goes on as one process and prints a note saying why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Set by torch.distributed.run and by the MPI launchers: a process that has any of them already has a rank.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                  "MV2_COMM_WORLD_RANK")


def _option_value(arguments: list[str], names: tuple[str, ...]) -> str | None:
    for index, argument in enumerate(arguments):
        for name in names:
            if argument == name and index + 1 < len(arguments):
                return arguments[index + 1]
            if argument.startswith(name + "="):
                return argument[len(name) + 1:]
    return None


def launcher_arguments() -> list[str] | None:
    """Return the parent process's command line, or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def requested_cpu_processes(environ: dict[str, str] | None = None,
                            parent_arguments: list[str] | None = None) -> tuple[int, str | None]:
    """Return (N, note): the CPU processes this run should start itself, 0 for none, and a note to print.

    N is non-zero only in the case the module docstring describes, on one machine.
    """
    environ = os.environ if environ is None else environ
    cpu_launch = environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in environ
    if not cpu_launch or any(name in environ for name in RANK_VARIABLES):
        return 0, None
    arguments = launcher_arguments() if parent_arguments is None else parent_arguments
    if not arguments or not any("accelerate" in part for part in arguments[:3]):
        return 0, ("reed train: accelerate asked for several CPU processes, but its command line cannot be read, "
                   "so this run uses one. Use `accelerate launch --multi_gpu --num_processes N ...` instead.")
    machines = _option_value(arguments, ("--num_machines", "--num-machines"))
    if machines not in (None, "1"):
        return 0, ("reed train: several CPU machines need accelerate's MPI launch (--mpirun_hostfile); "
                   "this run uses one process.")
    count = _option_value(arguments, ("--num_processes", "--num-processes"))
    if count is None or not count.isdigit():
        return 0, ("reed train: accelerate's --cpu launcher started one process and its --num_processes value "
                   "could not be read, so this run uses one.")
    return (int(count), None) if int(count) > 1 else (0, None)


def run_cpu_processes(count: int, arguments: list[str]) -> int:
    """Run ``python -m reed ARGUMENTS`` in ``count`` processes of one gloo group.

    Returns the exit code of the first process that fails, or 0.

    When one process fails, the others are stopped, since they would wait for it forever.
    """
    print(f"reed train: accelerate's --cpu launcher started one process; starting {count} on this machine.",
          flush=True)
    processes = []
    for rank in range(count):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count),
                   LOCAL_WORLD_SIZE=str(count), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(count))
        processes.append(subprocess.Popen([sys.executable, "-m", "reed", *arguments], env=env))

    def stop_all(signum, frame) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes: dict[int, int] = {}
        first_failure = 0
        while len(codes) < count:
            for rank, process in enumerate(processes):
                if rank in codes:
                    continue
                try:
                    codes[rank] = process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                if codes[rank] != 0 and not first_failure:
                    first_failure = codes[rank]
                    stop_all(signal.SIGTERM, None)
        return first_failure
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
