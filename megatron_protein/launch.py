"""torchrun that stays quiet about known errors: ``python -m megatron_protein.launch [torchrun flags] SCRIPT ...``.

Takes exactly torchrun's flags (it is ``torch.distributed.run`` underneath). The project's commands print a known
error (bad flags or data, a refused checkpoint, an output in use, ...) as one line ``error: ...`` on one rank and
exit with status 2 (:mod:`megatron_protein.utils.errors`). Plain torchrun then adds its own failure report, a
Python traceback of the launcher and a warning per rank it stops; this launcher leaves those out when every
failed rank exited with 2 (or was stopped by the launcher after that), and exits with 2 itself. Any other failure
is reported exactly as torchrun reports it. ``scripts/pretrain_pfam.sh`` launches through it.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Optional, Sequence

from megatron_protein.utils.errors import EXIT_USAGE

_ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _QuietAboutKnownErrors(logging.Filter):
    """Drops torchrun's per-rank lines about a rank that exited with 2 and about stopping the others."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("closing signal" in message or f"failed (exitcode: {EXIT_USAGE})" in message)


def _only_known_errors(failures) -> bool:
    codes = [failure.exitcode for failure in failures.values()]
    stopped = {-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM}
    return EXIT_USAGE in codes and all(code == EXIT_USAGE or code in stopped for code in codes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.getLogger(_ELASTIC_LOGGER).addFilter(_QuietAboutKnownErrors())
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        if _only_known_errors(exc.failures):
            return EXIT_USAGE  # a rank has printed the error line
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
