"""One module per dataset, each keeping the source contract; shared helpers in files, fetch and splits.

The contract of a dataset module (``dataset.source._target_`` names its ``load``):
- ``load(**cfg) -> pandas.DataFrame`` gets the ``dataset.source`` keys. It returns the normalized table:
  ``text`` (plus ``text_pair`` for sentence pairs, with ``dataset.text_pair: true``), an integer
  ``label``, one integer column per attribute, and ``split`` in ``splits.SPLITS`` (train, val, test).
- It exports its vocabulary: ``LABELS`` (label names by id) and ``ATTRIBUTES`` (``{column: value
  names by code}``). The dataset YAML refers to them with ``${sr.vocab:<module>,LABELS}``, so they are
  defined once. The datamodule checks every code against them (``datamodule.validate_table``).
- A file that is missing raises ``DataUnavailableError``, and a broken one raises ``CorruptDataError``.
  Each is one line that names the file (and the line, through ``files``) and says what to do.

Helpers: ``files`` reads and checks local jsonl/CSV/zip files, ``fetch`` downloads into the cache once
(and reads the hub), ``splits`` splits a set that ships undivided. The dataset config's own keys are
declared in ``subgroup_robustness.data.spec``.
"""
