"""SeqIO tasks and corpora of rest-jax (the data edge: TensorFlow and SeqIO live here).

`import tasks` registers the translation tasks of `tasks/translation.py`:
`libreoffice_help_de_en`, `libreoffice_help_zh_en`, `iwslt14_de_en`, `wmt20_zh_en`.
"""
from tasks import translation

translation.register_tasks()
