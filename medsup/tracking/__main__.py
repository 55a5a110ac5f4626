"""``python -m medsup.tracking replay SPOOL [--uri URI]``: re-send what a run could not send to MLflow."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medsup.tracking.spool import read_spool, replay_spool
from medsup.tracking.uri import TrackingUnavailable

log = logging.getLogger("medsup.tracking")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and replay; exit status 0 on success, 1 when the store is unreachable or refuses."""
    parser = argparse.ArgumentParser(prog="python -m medsup.tracking", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="re-send the unconfirmed records of spool files")
    replay.add_argument("spool", nargs="+", type=Path, help="mlflow-spool-<run>-<ms>.jsonl file(s)")
    replay.add_argument("--uri", help="tracking URI (default: the one recorded in each spool file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    status = 0
    for spool in args.spool:
        try:
            uri = args.uri or str(read_spool(spool)[0]["uri"])
            sent = replay_spool(spool, uri)
            log.info("%s: %d metric point(s) sent to %s", spool, sent, uri)
        except (TrackingUnavailable, ValueError, OSError, KeyError) as err:
            log.error("%s: %s", spool, err)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
