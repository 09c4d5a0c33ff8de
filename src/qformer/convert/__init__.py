"""State-dict adapters between qformer's layout and transformers' / LAVIS's / BERT's: rename
tables (:mod:`~qformer.convert.rename`) per layout and config mappings, a state dict in and a
state dict out. Nothing here builds a model or reads a file: :mod:`qformer.pretrained` does."""
