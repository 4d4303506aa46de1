"""A Cloud Storage server on localhost for `gs://` work-directory tests.

`gcp-storage-emulator` (pure Python, objects kept as files under a folder) speaks the JSON
API that gcsfs (stage files) and tensorstore (orbax checkpoints) use. Real GCS sends the
object's generation in an `x-goog-generation` header with every media download;
tensorstore requires it ("Malformed StorageGeneration" otherwise) and the emulator leaves
it out, so `start` adds it.

`client_env(url)` is the environment a client process needs to talk to it instead of
storage.googleapis.com.

Run standalone: `python tests/gcs_emulator.py PORT DATA_DIR` (bucket `bkt`).
"""
from __future__ import annotations

import socket
import sys
import time
from typing import Any

BUCKET = "bkt"


def _with_generation_header(download):
  def wrapped(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  (a 404 was already answered)
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return wrapped


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(data_dir: str, port: int | None = None) -> tuple[Any, str]:
  """Starts the server in background threads; returns (server, its http URL)."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  if not getattr(objects.download, "_adds_generation", False):
    objects.download = _with_generation_header(objects.download)
    objects.download._adds_generation = True  # pylint: disable=protected-access
  port = port or free_port()
  server = create_server("localhost", port, in_memory=False, default_bucket=BUCKET,
                         data_dir=data_dir)
  server.start()
  return server, f"http://localhost:{port}"


def client_env(url: str) -> dict[str, str]:
  """Environment variables that point gcsfs and tensorstore at the server at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (stage files through etils.epath)
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax array data)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "unused",  # tensorstore: skip credential lookup
      # gcsfs >= 2026 probes the bucket type over gRPC (a minute of retries against a
      # server without gRPC) unless its experimental zonal/HNS layer is off.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


if __name__ == "__main__":
  srv, address = start(sys.argv[2], int(sys.argv[1]))
  print(address, flush=True)
  while True:
    time.sleep(3600)
