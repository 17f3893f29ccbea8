"""One trainer per workdir: an exclusive lock held for the run's life.

The lock is ``fcntl.flock`` on ``WORKDIR/train.lock``: the kernel releases it when the holder
exits, however it exits (a crash or ``kill -9`` included), so a stale lock is simply free. The
file records the holder's host and pid; a new trainer that finds the record of a holder that
no longer holds the lock takes over with a warning naming it.
"""
import fcntl
import json
import os
import socket
import time

from absl import logging

LOCK_FILE = 'train.lock'


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir."""


class WorkdirLock:
  """``with WorkdirLock(workdir):`` runs the body holding the workdir's trainer lock.

  Bucket workdirs (``gs://...``) cannot be locked; there a warning says so and nothing is held.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = None if '://' in workdir else os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self) -> 'WorkdirLock':
    if self.path is None:
      logging.warning('%s is a bucket: it cannot be locked, so make sure only one trainer '
                      'uses it.', self.workdir)
      return self
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read_holder()
      self._file.close()
      self._file = None
      raise WorkdirLockedError(
          f'{self.workdir} is in use by another trainer ({_describe(holder)}); stop it first, '
          'or use another --workdir.') from None
    previous = self._read_holder()
    if previous:
      logging.warning('Taking over %s from a trainer that ended without releasing it (%s).',
                      self.path, _describe(previous))
    self._file.seek(0)
    self._file.truncate()
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()},
              self._file)
    self._file.flush()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._file is None:
      return
    self._file.seek(0)
    self._file.truncate()  # A clean exit leaves no holder on record.
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def _read_holder(self) -> dict:
    self._file.seek(0)
    text = self._file.read().strip()
    try:
      return json.loads(text) if text else {}
    except ValueError:
      return {'record': text[:100]}


def _describe(holder: dict) -> str:
  if 'pid' in holder:
    return f'host {holder.get("host", "?")}, pid {holder["pid"]}'
  return f'holder record {holder}' if holder else 'no holder on record'
