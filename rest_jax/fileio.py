"""Small file I/O shared by every stage: paths or URLs, atomic writes, JSON, `.npz` params.

Every function takes a local path or a URL that `etils.epath` understands (`gs://bucket/dir`,
`s3://...` with the matching backend installed), so a work directory can live on a bucket. Writes
are atomic: the content goes to `<path>.tmp.<pid>` first (one temporary name per process, so that
workers or hosts writing the same file at once do not write into each other's temporary file)
and is then renamed over `path` (a local
`os.replace`; a copy + delete on object stores, where a reader sees the old object or the new one,
never a partial one), so a killed run leaves either the old file or the new one, never half a
file. TensorFlow is not imported here (the TFRecord files are `rest_jax.records`'s).

A write that fails part-way (a full disk: `OSError` ENOSPC from the writer) removes its temporary
file and re-raises, so nothing partial is left behind and a rerun writes the file afresh.

Fault injection (tests and `scripts/fault_soak.py`): every completed write (`atomic_replace`, and
`note_write` for files written by libraries, e.g. orbax checkpoints) is counted. With the
environment variable `REST_JAX_KILL_AT_WRITE='REGEX#N'` the process SIGKILLs itself at the N-th
write whose path matches REGEX, just before that write's rename (the temporary file is complete,
the file itself not yet there); `REST_JAX_WRITE_LOG=FILE` appends every write's path to FILE.

Also: `repo_path` (shipped files such as `checkpoints/...` resolved against the repository) and
`portable_path` (how settings record a path: relative to the work directory when inside it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from typing import Any, IO

import flax.traverse_util
import jax
import numpy as np
from etils import epath

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_url(path: str) -> bool:
  """True for `scheme://...` paths (object stores), False for local paths."""
  return '://' in str(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path` (local paths made absolute)."""
  return epath.Path(path if is_url(str(path)) else os.path.abspath(path))


def abspath(path: str) -> str:
  """`path` made absolute (`os.path.abspath`); a URL as given (`os.path.abspath('gs://b/x')`
  would turn it into a local path)."""
  return str(path).rstrip('/') if is_url(path) else os.path.abspath(path)


def parent(path: str) -> str:
  """The folder holding `path` (absolute for a local path; for a URL the part before the last
  '/')."""
  return abspath(path).rsplit('/', 1)[0] if is_url(path) else os.path.dirname(abspath(path))


def local_cache_dir(workdir: str) -> str:
  """The local folder for a work directory's caches (tokenized tasks, the XLA cache): caches stay
  on local disk even when the work directory is a URL.

  A local work directory: `<workdir>/cache`. A URL: `$REST_JAX_CACHE_DIR/<scheme>/<rest of the
  URL>-<8 hex of its sha256>` (default `$REST_JAX_CACHE_DIR`: `~/.cache/rest_jax`), the same
  folder for every run of that URL on this machine, so a resumed run reuses it.
  """
  if not is_url(workdir):
    return os.path.join(os.path.abspath(workdir), 'cache')
  url = abspath(workdir)
  scheme, rest = url.split('://', 1)
  root = os.environ.get('REST_JAX_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache',
                                                               'rest_jax')
  tag = hashlib.sha256(url.encode()).hexdigest()[:8]
  return os.path.join(root, scheme, re.sub(r'[^A-Za-z0-9._-]+', '_', rest)[-80:] + '-' + tag)


def exists(path: str) -> bool:
  return as_path(path).exists()


def isdir(path: str) -> bool:
  return as_path(path).is_dir()


def makedirs(path: str) -> None:
  as_path(path).mkdir(parents=True, exist_ok=True)


def remove(path: str) -> None:
  """Removes the file `path` if it exists."""
  p = as_path(path)
  if p.exists():
    p.unlink()


def listdir(path: str) -> list[str]:
  """Sorted names of the entries of the folder `path` ([] if it does not exist)."""
  p = as_path(path)
  return sorted(c.name for c in p.iterdir()) if p.exists() else []


def rmtree(path: str) -> None:
  """Removes the folder `path` and everything in it, if it exists."""
  p = as_path(path)
  if p.exists():
    p.rmtree()


def glob(directory: str, pattern: str) -> list[str]:
  """Sorted paths (as `str`) of the entries of `directory` matching the glob `pattern`."""
  d = as_path(directory)
  if not d.exists():
    return []
  return sorted(os.path.join(directory, p.name) for p in d.glob(pattern))


def open_file(path: str, mode: str = 'r') -> IO:
  """`open` for paths and URLs (`epath.Path.open`)."""
  return as_path(path).open(mode)


def _copy_stream(src: IO, dst: IO) -> None:
  shutil.copyfileobj(src, dst, length=1 << 20)


@contextlib.contextmanager
def local_copy(path: str):
  """A local file with the content of `path`, for readers that need a local file name
  (TensorFlow's TFRecord reader, which knows only the `gs://` of the URL schemes): `path` itself
  when local; for a URL a temporary download, removed afterwards.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  if not is_url(path):
    yield path
    return
  fd, local = tempfile.mkstemp(prefix='rest_jax_', suffix='.' + os.path.basename(path))
  try:
    with os.fdopen(fd, 'wb') as out, open_file(path, 'rb') as src:
      _copy_stream(src, out)
    yield local
  finally:
    os.remove(local)


@contextlib.contextmanager
def staged_write(path: str, tmp: str | None = None):
  """Atomic write of `path` by a writer that needs a local file name (TensorFlow's TFRecord
  writer, matplotlib): yields a local temporary name to write; when the block ends without an
  error the file is renamed (local) or uploaded (URL: to `temp_path(path)`, then replaced) over
  `path`. On an error the temporary file is removed and the error re-raised.

  tmp: the local temporary name (default `temp_path(path)`); for URLs a local temp file is used.
  """
  if not is_url(path):
    tmp = tmp or temp_path(path)
    _discard(tmp)  # A partial file of a killed run.
    try:
      yield tmp
    except BaseException:
      _discard(tmp)
      raise
    atomic_replace(tmp, path)
    return
  fd, local = tempfile.mkstemp(prefix='rest_jax_', suffix='.' + os.path.basename(path))
  os.close(fd)
  remote_tmp = temp_path(path)
  try:
    yield local
    with open(local, 'rb') as src, open_file(remote_tmp, 'wb') as out:
      _copy_stream(src, out)
  except BaseException:
    _discard(remote_tmp)
    raise
  finally:
    os.remove(local)
  atomic_replace(remote_tmp, path)


def upload_tree(local_dir: str, url: str) -> None:
  """Copies every file under the local folder `local_dir` to the same relative name under `url`
  (overwriting): for libraries that write into a local folder (TensorBoard event files)."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      src = os.path.join(root, name)
      dst = url.rstrip('/') + '/' + os.path.relpath(src, local_dir).replace(os.sep, '/')
      makedirs(dst.rsplit('/', 1)[0])
      with open(src, 'rb') as f, open_file(dst, 'wb') as out:
        _copy_stream(f, out)


_writes: dict[str, int] = {}  # Fault injection: writes matching the kill pattern so far.


def note_write(path: str) -> None:
  """Counts one write of `path` for fault injection (see the module docstring); may SIGKILL."""
  log = os.environ.get('REST_JAX_WRITE_LOG')
  if log:
    with open(log, 'a') as f:
      f.write(f'{path}\n')
  spec = os.environ.get('REST_JAX_KILL_AT_WRITE')
  if spec:
    pattern, _, n = spec.rpartition('#')
    if re.search(pattern, str(path)):
      _writes[spec] = _writes.get(spec, 0) + 1
      if _writes[spec] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def _discard(tmp: str) -> None:
  try:
    remove(tmp)
  except OSError:
    pass


def atomic_replace(tmp: str, path: str) -> None:
  """Renames the finished `tmp` over `path` (the last step of every atomic write)."""
  note_write(path)
  if is_url(path):
    as_path(tmp).replace(as_path(path))
  else:
    os.replace(tmp, path)


def temp_path(path: str, suffix: str = '') -> str:
  """The temporary name an atomic write of `path` writes first: `<path>.tmp.<pid><suffix>`, one
  per process (hosts or workers writing the same file at once, e.g. a shared cache, do not write
  into or rename each other's temporary file). `suffix`: for writers that need an extension."""
  return f'{path}.tmp.{os.getpid()}{suffix}'


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (parent dirs created)."""
  makedirs(parent(path))
  tmp = temp_path(path)
  try:
    with open_file(tmp, 'wb') as f:
      f.write(text.encode('utf-8'))
  except BaseException:
    _discard(tmp)  # A full disk, a failed upload: no partial file is left.
    raise
  atomic_replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON atomically (numpy values as lists / numbers)."""
  write_text(path, json.dumps(obj, indent=1, sort_keys=True,
                              default=lambda x: np.asarray(x).tolist()))


def write_jsonl(path: str, rows) -> None:
  """One JSON object a line (UTF-8, not ASCII-escaped), written atomically."""
  write_text(path, ''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows))


def read_json(path: str) -> Any:
  """The JSON value in `path`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not valid JSON (names the file and the position), e.g. a file cut
      short by a full disk.
  """
  with open_file(path, 'rb') as f:
    text = f.read().decode('utf-8')
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); a run killed while writing it (files '
                     'here are written atomically) or a hand edit; restore or delete it') from e


def repo_path(path: str) -> str:
  """`path` as given if it exists, is absolute or is a URL, else relative to the repository
  (shipped files: `checkpoints/rm_small`, `checkpoints/base_tiny_math_arithmetic_chain`)."""
  if is_url(path) or os.path.isabs(path) or os.path.exists(path):
    return path
  return os.path.join(REPO_ROOT, path)


def portable_path(path: str | None, workdir: str) -> str | None:
  """How settings record `path`: relative to `workdir` when inside it (so a work directory can be
  moved or copied to a bucket and still resume), else absolute (or the URL as given). None stays
  None. Our choice: a path outside the work directory (a shipped checkpoint, another run) is
  recorded as is, since it names a different file from another location."""
  if path is None:
    return None
  if is_url(path) or is_url(workdir):
    p, w = str(path).rstrip('/'), str(workdir).rstrip('/')
    return p[len(w) + 1:] if p.startswith(w + '/') else p
  p, w = os.path.abspath(path), os.path.abspath(workdir)
  return os.path.relpath(p, w) if p == w or p.startswith(w + os.sep) else p


def resolve_path(path: str | None, workdir: str) -> str | None:
  """Inverse of `portable_path`: a recorded relative path joined to `workdir`."""
  if path is None or is_url(path) or os.path.isabs(path):
    return path
  return os.path.join(workdir, path)


def relocate(recorded: str | None, old_dir: str | None, new_dir: str) -> str | None:
  """A path that a run recorded (absolute) as seen from where that run's folder is now.

  `old_dir` is where the recording folder was (recorded with it; None for files written before
  this was recorded), `new_dir` where it is now: after a work directory was moved or copied,
  `recorded` = `<old parent>/x` becomes `<new parent>/x`. A recorded path that still exists, or
  one outside the old parent's tree, is returned as is. Without `old_dir` a missing path is
  looked up as a sibling of `new_dir` (the loop's stages are siblings): our heuristic.
  """
  if recorded is None or is_url(recorded) or os.path.exists(recorded):
    return recorded
  if not os.path.isabs(recorded):
    return os.path.join(os.path.dirname(os.path.abspath(new_dir)), recorded)
  if old_dir:
    old_parent = os.path.dirname(os.path.abspath(old_dir))
    if recorded.startswith(old_parent + os.sep):
      return os.path.join(os.path.dirname(os.path.abspath(new_dir)),
                          os.path.relpath(recorded, old_parent))
    return recorded
  sibling = os.path.join(os.path.dirname(os.path.abspath(new_dir)),
                         os.path.basename(recorded.rstrip(os.sep)))
  return sibling if os.path.exists(sibling) else recorded


# -- params as .npz (shipped policies and reward models) ------------------------------------------

def save_params_npz(path: str, params: Any, dtype=np.float16) -> None:
  """Writes params as one compressed `.npz` (keys: '/'-joined tree paths), cast to `dtype`.

  For shipping a small policy with the repository (float16 halves the size; the tiny policy's
  weights are far inside its range). Written atomically.
  """
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')
  makedirs(parent(path))
  tmp = temp_path(path, '.npz')
  try:
    with open_file(tmp, 'wb') as f:
      np.savez_compressed(f, **{k: np.asarray(v).astype(dtype) for k, v in flat.items()})
  except BaseException:
    _discard(tmp)
    raise
  atomic_replace(tmp, path)


def load_params_npz(path: str, target_params: Any) -> Any:
  """Params from `save_params_npz`, cast to and laid out like `target_params` (abstract or not).

  Raises:
    ValueError: the file's tree paths or shapes differ from `target_params`'s (names them).
  """
  flat_target = flax.traverse_util.flatten_dict(target_params, sep='/')
  with open_file(path, 'rb') as fh, np.load(fh) as f:
    stored = {k: f[k] for k in f.files}
  if set(stored) != set(flat_target):
    raise ValueError(f'{path}: parameter names differ from the model: missing '
                     f'{sorted(set(flat_target) - set(stored))[:5]}, unexpected '
                     f'{sorted(set(stored) - set(flat_target))[:5]}')
  out = {}
  for k, t in flat_target.items():
    if stored[k].shape != tuple(t.shape):
      raise ValueError(f'{path}: {k} has shape {stored[k].shape}, the model {tuple(t.shape)}')
    v = stored[k].astype(t.dtype)
    sharding = getattr(t, 'sharding', None)
    out[k] = jax.device_put(v, sharding) if sharding is not None else jax.numpy.asarray(v)
  return flax.traverse_util.unflatten_dict(out, sep='/')
