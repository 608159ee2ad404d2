"""One module per dataset. Each exposes ``load(**cfg) -> pandas.DataFrame`` returning the normalized
table: ``text`` (and ``text_pair`` for sentence pairs), integer ``label``, one integer column per
attribute, and ``split`` in {train, val, test}."""
