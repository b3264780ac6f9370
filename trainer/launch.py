"""`python -m trainer.launch [torchrun args] trainer/main.py --config ...`: torchrun with
exit codes that mean something to whoever runs it (the operator, a job scheduler).

Plain torchrun exits 1 for every failure, and with a traceback when it is itself told
to stop. This launcher runs the same torchrun in-process and exits with:
  0     every worker finished;
  2     a worker rejected the config or its inputs (retrying cannot help);
  3     trained and exported, but the upload to output.uri failed;
  4     training diverged: the loss stayed NaN or infinite (retrying the same config cannot help);
  143   stopped by SIGTERM (preemption, suspend, delete), after the workers saved a checkpoint;
  1     the nodes did not all join the rendezvous in time (--rdzv_conf timeout=...);
  N     otherwise the first failed worker's exit code (or 128 + signal when it was killed).
"""

from __future__ import annotations

import sys


def exit_code_for_failure(exitcode: int) -> int:
    """Map a worker's exit status (negative: killed by that signal) to a shell-style code."""
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as stop:
        print(f"launcher: stopped by signal {int(stop.sigval)}", file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    except DistStoreError as error:
        # Raised by the static rendezvous itself, before any worker started: no traceback
        # of torchrun's internals, but what to look at.
        print(f"launcher: the nodes did not all reach the rendezvous ({error}); look for workers still pending "
              "or failing to start, the rendezvous address not resolving (its headless Service), or a network "
              "policy between the nodes", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as failure:
        rank, first = failure.get_first_failure()
        code = exit_code_for_failure(first.exitcode)
        print(f"launcher: rank {rank} failed with exit code {code}", file=sys.stderr, flush=True)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
