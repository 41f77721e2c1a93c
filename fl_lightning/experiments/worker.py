"""A process that runs many `fit` commands one after another, paying for the import of torch and Lightning once.

Starting Python, torch and Lightning takes about 10 s on a small CPU machine, a fifth of a short run
of the claims check. `python -m fl_lightning.experiments.worker` reads one JSON request per line on
stdin, `{"args": ["fit", ...], "log": PATH}`, runs `fl_lightning.__main__.main(args)` with its stdout
and stderr appended to the log file, and answers `{"returncode": N}` on one line of stdout.

A run in a worker gives the bitwise-same model as in a fresh process: every random draw of a run
comes from its own seeded generators, threads are set per run, and the worker holds no other state
between runs (tested in `tests/test_sweeps.py`). Runs that start several processes (`--devices N`)
launch them from the command line of the process, so they keep a process of their own. The parent's
side, which starts a worker and hands it runs, is `fl_lightning.experiments.sweep.Worker`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def serve() -> None:
    """The worker's loop: one request in, one run, one reply out, until stdin closes."""
    from fl_lightning.__main__ import main

    reply = os.fdopen(os.dup(1), "w")  # the answers; fds 1 and 2 go to each run's log while it runs
    for line in sys.stdin:
        request = json.loads(line)
        saved = os.dup(1), os.dup(2)
        with open(request["log"], "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                main(request["args"])
                returncode = 0
            except SystemExit as stop:
                returncode = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # a failed run, not a failed worker: report it and take the next
                traceback.print_exc()
                returncode = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        reply.write(json.dumps({"returncode": returncode}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
