"""One job per work directory: an operating-system lock that a second job is refused by.

Every `rest-jax` command that writes a work directory holds `<workdir>/.lock` while it runs
(`hold`). The lock is an `fcntl.flock` on that open file, not the file's existence: the kernel
releases it when the holder exits in any way (a crash, SIGKILL, a preempted VM), so a killed run
never blocks the next one, and there is nothing to clean up. The file's content names the holder
(pid, host, start time, command line, job id) for the refusal message; it is rewritten by each
new holder and never deleted.

Workers and hosts of the same job join it instead of being refused: a process whose job id (the
environment variable `REST_JAX_JOB_ID`, set identically for every worker of a job) equals the
holder's is admitted without the lock, and so is every host but the first of a multi-host job
(`jax.process_index() > 0`: the first host holds the lock for all). Our choice: the lock guards
against a *second, independent* job (two `scripts/main.sh` on one directory), not against
workers of one job, which share the work through the chunk files and markers.

Object stores (`gs://...`) have no such lock: a work directory there is not locked and a warning
says so (run one job per directory by other means, e.g. one launcher per URL).

`flock` on NFS is honoured by Linux NFS clients (v4 locks); on file systems without lock support
`hold` raises `JobLockError` naming the file rather than running unlocked.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Iterator

LOCK_FILE = '.lock'
JOB_ID_ENV = 'REST_JAX_JOB_ID'


class JobLockError(RuntimeError):
  """Another job holds the work directory (the message names it)."""


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('start')}, "
          f"command: {holder.get('command')}"
          + (f", job id {holder['job_id']}" if holder.get('job_id') else ''))


def _read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or '{}')
  except (OSError, ValueError):
    return {}


@contextlib.contextmanager
def hold(workdir: str, command: str | None = None) -> Iterator[dict]:
  """Holds `workdir`'s job lock for the duration of the `with` block.

  Args:
    workdir: the work directory (created if missing). A URL is not locked (warning).
    command: recorded for the refusal message (default: this process's command line).

  Yields:
    The holder record: {'pid', 'host', 'start' (ISO 8601, UTC), 'command', 'job_id', 'role'}
    with role 'holder', 'joined' (same job id as the holder, or a host > 0) or 'unlocked' (URL).

  Raises:
    JobLockError: another job holds the lock (names its pid, host, start time and command), or
      the file system does not support locks.
  """
  me = dict(pid=os.getpid(), host=socket.gethostname(),
            start=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            command=command or ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            job_id=os.environ.get(JOB_ID_ENV) or None)
  if '://' in str(workdir):
    logging.warning('joblock: %s is on an object store, which has no lock: make sure no other '
                    'job writes it', workdir)
    yield dict(me, role='unlocked')
    return
  import jax
  if jax.process_count() > 1 and jax.process_index() > 0:
    yield dict(me, role='joined')  # Host 0 of this job holds the lock.
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(path)
      if me['job_id'] and holder.get('job_id') == me['job_id']:
        logging.info('joblock: joining job %s in %s (held by %s)', me['job_id'], workdir,
                     _describe(holder))
        yield dict(me, role='joined')
        return
      raise JobLockError(f'{workdir} is in use by another job ({_describe(holder)}); wait for '
                         f'it to finish or stop it, or use another --workdir (workers of one '
                         f'job share it by setting the same {JOB_ID_ENV})') from None
    except OSError as e:
      raise JobLockError(f'{path}: the file system does not support locks ({e}); use a local '
                         'or NFSv4 work directory') from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    os.fsync(fd)
    yield dict(me, role='holder')
  finally:
    os.close(fd)  # Releases the flock (the kernel does the same if this process dies).
