"""A job's data paths checked at submit, on the controller's view of shared storage.

`data.paths` of a `files` or `parquet` source name files, folders or globs that every island
host reads where the controller prepares them (a shared filesystem). A local entry must match
at least one file or folder here, or the submission is refused with the entry's field named
(`data.paths[0]`); an object-store URL (`gs://bucket/x`, `s3://...`) is refused: nothing
reads one (mount the objects as files). A `text2text` source's local files
(also inside `data.mixture`) must have `inputs` and `targets` (a JSON Lines file's first row,
a table's schema).
"""

from __future__ import annotations

import glob
import os

from pathways_lite.v1 import controller_pb2

from .spec import SpecError

SOURCES_WITH_PATHS = ("files", "parquet", "text2text")


def check_data_paths(spec: controller_pb2.JobSpec) -> None:
    """Refuse a spec whose data paths name nothing the controller can see.

    Raises:
        SpecError: an entry matches no file or folder, or a URL does not parse.
    """
    data = spec.data
    groups = [("data", data.source, data.paths)]
    groups += [(f"data.mixture[{i}]", e.source, e.paths) for i, e in enumerate(data.mixture)]
    for prefix, source, paths in groups:
        if source in SOURCES_WITH_PATHS:
            _check_paths(prefix, paths)
        if source == "text2text" and not any("://" in p for p in paths):
            from pathways_lite.model.corpus import DataError
            from pathways_lite.model.tasks import check_task_files

            try:
                check_task_files(paths)
            except DataError as e:
                raise SpecError(f"{prefix}.paths", list(paths), f"{prefix}.paths: {e}") from None


def _check_paths(prefix: str, paths) -> None:
    for i, entry in enumerate(paths):
        field = f"{prefix}.paths[{i}]"
        if "://" in entry:
            # Nothing reads one (the data is read as files): refused here, not at the job's
            # start with "matches no files".
            raise SpecError(
                field,
                entry,
                f"{field}={entry!r} is a URL; data is read from files on storage every island "
                "host and the controller share (copy or mount the objects there and give "
                "their path).",
            )
        matches = glob.glob(os.path.expanduser(entry), recursive=True)
        if not any(os.path.isfile(m) or os.path.isdir(m) for m in matches):
            raise SpecError(
                field,
                entry,
                f"{field}={entry!r} matches no file or folder on the controller's view of "
                "shared storage (data paths must be readable where the controller and every "
                "island host run).",
            )
