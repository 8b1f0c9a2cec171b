"""Starts `gcp-storage-emulator` (a Cloud Storage server in memory, for tests) with one fix.

Usage: python tests/gcs_emulator.py --port=PORT --bucket=NAME

The emulator's media downloads do not send the `x-goog-generation` header that real Cloud Storage
sends and TensorStore's `gcs` driver (orbax's checkpoint storage) requires ("Malformed
StorageGeneration"); this wrapper adds it, and `x-goog-metageneration`, from the object's
metadata. It also answers gcsfs's `moveTo` (a rename: here a copy and a delete), which the
emulator answers 501, so that gcsfs does not retry it with back-off before falling back to copy
and delete at every atomic write. Nothing else is changed.
"""

import argparse
import re

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(obj.get('generation') or 0)
    response['x-goog-metageneration'] = str(obj.get('metageneration') or 1)
  except Exception:  # noqa: BLE001  (not found: the download answers 404 itself)
    pass
  return _download(request, response, storage, *args, **kwargs)


def _move(request, response, storage, *args, **kwargs):
  p = request.params
  try:
    obj = objects._copy(request.base_url, storage, p['bucket_name'], p['object_id'],
                        p['bucket_name'], p['dest_object_id'])
  except objects.NotFound:
    response.status = 404
    return
  objects._delete(storage, p['bucket_name'], p['object_id'])
  response.json(obj)


objects.download = _download_with_generation  # Used by objects.get (`alt=media`).
for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler is _download:
      methods[method] = _download_with_generation

server.HANDLERS = tuple(
    (rf'^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
     r'(?P<dest_object_id>.*[^/]+)$', {server.POST: _move})
    for prefix in (re.escape(server.settings.API_ENDPOINT), '')) + server.HANDLERS

if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--bucket', required=True)
  a = parser.parse_args()
  emulator_main.main(['start', '--host=127.0.0.1', f'--port={a.port}', '--in-memory',
                      f'--default-bucket={a.bucket}'])
