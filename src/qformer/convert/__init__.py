"""State-dict adapters between qformer's layout and transformers' / LAVIS's / BERT's: rename
tables (:mod:`~qformer.convert.rename`) per layout, and the ``qformer convert`` command."""
