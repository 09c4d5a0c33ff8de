"""Data: caption, VQA, instruction and tar-shard datasets, image transforms, collation, image files, built-in scenes."""
