"""Stand-ins for Slurm's ``srun`` and ``scontrol`` in tests/test_gcp.py (the first argument
picks which).

``scontrol show hostnames LIST`` prints ``localhost`` once per task node (``$FAKE_SLURM_NODES``,
default 1). ``srun [--option ...] COMMAND ...`` starts COMMAND once per task
(``$SLURM_NTASKS``) at once, with ``SLURM_PROCID`` and ``SLURM_LOCALID`` set (tasks spread over
the nodes in blocks), each task's output in ``--output``'s file pattern (``%j``: the job id,
``%t``: the task), waits for all and exits with the first nonzero status.
"""

from __future__ import annotations

import os
import subprocess
import sys


def scontrol(args: list[str]) -> int:
  if args[:2] != ["show", "hostnames"]:
    return 2
  print("\n".join(["localhost"] * int(os.environ.get("FAKE_SLURM_NODES", "1"))))
  return 0


def srun(args: list[str]) -> int:
  output = None
  while args and args[0].startswith("--"):
    if args[0].startswith("--output="):
      output = args[0].split("=", 1)[1]
    args = args[1:]
  tasks = int(os.environ["SLURM_NTASKS"])
  per_node = -(-tasks // int(os.environ.get("FAKE_SLURM_NODES", "1")))
  processes = []
  for task in range(tasks):
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node))
    path = (output or "/dev/stdout").replace("%j", os.environ["SLURM_JOB_ID"])
    log = open(path.replace("%t", str(task)), "ab")  # noqa: SIM115 (closed below)
    processes.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  statuses = []
  for process, log in processes:
    statuses.append(process.wait())
    log.close()
  return next((s for s in statuses if s), 0)


if __name__ == "__main__":
  tool, arguments = sys.argv[1], sys.argv[2:]
  sys.exit({"srun": srun, "scontrol": scontrol}[tool](arguments))
