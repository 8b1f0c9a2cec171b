"""SeqIO tasks and corpora of rest-jax (the data edge: TensorFlow and SeqIO live here).

`import tasks` registers the translation tasks of `tasks/translation.py`:
`libreoffice_help_de_en`, `libreoffice_help_zh_en`, `iwslt14_de_en`, `wmt20_zh_en`; and the
problem-solving tasks of `tasks/math.py` (ReST-EM): `arithmetic_chain`, `gsm8k`.
"""
from tasks import math as math_tasks
from tasks import translation

translation.register_tasks()
math_tasks.register_tasks()


def data_fingerprint(task_name: str) -> str:
  """A short string that changes whenever `task_name`'s data may (for cache file names).

  '' for the translation tasks (their data are files named by the task); for `arithmetic_chain`
  a hash of the generator settings, for `gsm8k` a hash of the data folder and its files' sizes
  (see `tasks.math.data_fingerprint`).

  Raises:
    KeyError: an unknown task (a new task must say what identifies its data).
  """
  if task_name in translation.TASK_NAMES:
    return ''
  return math_tasks.data_fingerprint(task_name)
