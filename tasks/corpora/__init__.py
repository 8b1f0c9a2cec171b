"""Builders for the parallel corpora shipped under ``tasks/data/``.

``tasks.corpora.libreoffice`` rebuilds ``tasks/data/libreoffice_help`` (de-en and
zh-en pairs aligned paragraph by paragraph from the LibreOffice help pages in Debian).
"""
