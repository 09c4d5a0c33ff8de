"""What users load and save: the models with their tokenizers and preprocessing, read from and
written to directories (qformer's layout, transformers', LAVIS's files: :mod:`.transformers`,
:mod:`.lavis`, on :mod:`qformer.convert`'s key tables). The architectures they extend are in :mod:`qformer.models`."""
