"""``python -m pallas_kernels.probes``: every route's checks on this host, as a Markdown table.

Runs on a CPU in well under a minute (the Mosaic GPU interpret mode is the slowest check);
``--routes`` picks some of mosaic_gpu, triton_pallas, jax_triton, xla. Exit status 0 (the
table is the result, failures included), 2 for an unknown route.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import jax

ROUTES = ("mosaic_gpu", "triton_pallas", "jax_triton", "xla")


def render(results) -> str:
  """The results as a Markdown table, headed by the JAX and Python versions."""
  lines = [
    f"JAX {jax.__version__}, jaxlib {jax.lib.__version__}, Python "
    f"{platform.python_version()}, backend {jax.default_backend()}",
    "",
    "| route | check | status | evidence |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {r.route} | {r.check} | {r.status} | {r.detail.replace('|', '/')} |" for r in results
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m pallas_kernels.probes", description=__doc__.splitlines()[0]
  )
  parser.add_argument(
    "--routes",
    default=",".join(ROUTES),
    help=f"comma-separated routes (default: all of {', '.join(ROUTES)})",
  )
  args = parser.parse_args(argv)
  routes = [name.strip() for name in args.routes.split(",") if name.strip()]
  unknown = sorted(set(routes) - set(ROUTES))
  if unknown:
    print(
      f"--routes: unknown route(s) {', '.join(unknown)}; choose from {', '.join(ROUTES)}",
      file=sys.stderr,
    )
    return 2
  results = []
  for route in routes:
    results += importlib.import_module(f"pallas_kernels.probes.{route}").probes()
  print(render(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
