"""MLflow tracking: the only package of medsup that imports mlflow.

- :func:`resolve_tracking_uri` picks the store (``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > config >
  ``sqlite:///<output>/mlflow.db``); :func:`check_reachable` fails fast before training.
- :class:`RunTracker` is one run per training: params, tags, buffered metrics, artifacts, resume by run id,
  and a local spool so that a tracking server dropping mid-run loses nothing.
- :func:`run_output_dir` finds a run's output folder from its ``medsup.output_dir`` tag (``--resume RUN_ID``).
- :func:`replay_spool` re-sends what a run could not (also ``python -m medsup.tracking replay FILE``).

Importing this package imports mlflow (about 2 s): import it inside commands, not at CLI start-up.
"""

from medsup.tracking.runs import RunTracker, run_output_dir
from medsup.tracking.spool import replay_spool
from medsup.tracking.uri import TrackingUnavailable, check_reachable, resolve_tracking_uri

__all__ = [
    "RunTracker",
    "TrackingUnavailable",
    "check_reachable",
    "replay_spool",
    "resolve_tracking_uri",
    "run_output_dir",
]
