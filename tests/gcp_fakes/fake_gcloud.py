"""A stand-in for ``gcloud`` in tests/test_gcp.py: records its calls, plays a queued resource.

The state lives in the directory ``$FAKE_GCLOUD_DIR``: ``script.json`` (written by the test)
says what the queued resource does, ``calls.jsonl`` gets one JSON list (the arguments) per
call, ``state.json`` is the fake's memory. ``script.json`` holds

  lives: one list of states per creation, e.g. [["WAITING_FOR_RESOURCES", "ACTIVE",
         "PREEMPTED"], ["ACTIVE"]]: each ``describe`` returns the next state of the current
         life (the last one repeats);
  exit_status: what the last life's trainer ends with (default 0);
  probes_before_exit: how many status probes after a launch in the last life say ``running``
         before the trainer has ended (default 0). Earlier lives' trainers run until preempted;
  fail_calls: numbers of calls (1 is the first) that fail with status 1 and change nothing;
  preflight_status: what the memory preflight (python -m train.aot) exits with (default 0).

Only the commands the gcp/ TPU scripts use are understood; anything else exits 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys


def _load(directory: pathlib.Path) -> tuple[dict, dict]:
  script = json.loads((directory / "script.json").read_text())
  state_file = directory / "state.json"
  state = (
    json.loads(state_file.read_text())
    if state_file.exists()
    else {
      "exists": False,
      "life": -1,
      "describes": 0,
      "setup": False,
      "launched": False,
      "probes": 0,
    }
  )
  return script, state


def _ssh(command: str, script: dict, state: dict) -> int:
  last_life = state["life"] == len(script["lives"]) - 1
  if "git clone" in command:
    state["setup"] = True
    print("fake-host: cce_jax installed")
  elif "train.aot" in command:
    print("fake-host: preflight: peak memory fits")
    return script.get("preflight_status", 0)
  elif "nohup" in command:
    state["launched"], state["probes"] = True, 0
    print("fake-host: trainer started")
  elif "echo fresh" in command:
    if not state["setup"]:
      print("fresh")
    elif not state["launched"]:
      print("stopped")
    elif last_life and state["probes"] >= script.get("probes_before_exit", 0):
      print(f"exit:{script.get('exit_status', 0)}")
    else:
      state["probes"] += 1
      print("running")
  else:
    return 2
  return 0


def main(argv: list[str]) -> int:
  directory = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
  calls = directory / "calls.jsonl"
  with calls.open("a") as log:
    log.write(json.dumps(argv) + "\n")
  script, state = _load(directory)
  if len(calls.read_text().splitlines()) in script.get("fail_calls", []):
    print("ERROR: (gcloud) a failure the test asked for", file=sys.stderr)
    return 1
  words = [a for a in argv if not a.startswith("-")]
  if words[:3] != ["compute", "tpus", "queued-resources"] and words[:4] != [
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
  ]:
    return 2
  verb = words[3]
  status = 0
  if verb == "create":
    if state["exists"]:
      print("ERROR: (gcloud) already exists", file=sys.stderr)
      status = 1
    else:
      state.update(exists=True, life=state["life"] + 1, describes=0, setup=False, launched=False)
  elif verb == "describe":
    if not state["exists"]:
      print("ERROR: (gcloud) NOT_FOUND: queued resource not found", file=sys.stderr)
      status = 1
    else:
      life = script["lives"][state["life"]]
      print(life[min(state["describes"], len(life) - 1)])
      state["describes"] += 1
  elif verb == "delete":
    state["exists"] = False
  elif verb == "ssh" and state["exists"]:
    command = next(a for a in argv if a.startswith("--command="))
    status = _ssh(command, script, state)
  else:
    status = 2
  (directory / "state.json").write_text(json.dumps(state))
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
