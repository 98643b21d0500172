"""Data: records schema, manifest -> ArrayRecord preparation, Grain pipelines, teachers, tokenizers,
and the synthetic Shapes world.

  records.py       the record schema (RecordSpec, SCHEMA_VERSION, open_prepared)
  prepare_args.py  `unialignment prepare` arguments (no jax import)
  prepare.py       `unialignment prepare`: JSONL manifests -> TFDS ArrayRecord dataset (run(args, config))
  prepare_rows.py  its rows: latents, teacher features, checks; bad rows reported and skipped
  tfds_builder.py  the TFDS GeneratorBasedBuilder (array_record, no TensorFlow)
  images.py        decode / official resize + centre crop / encode / normalize
  teachers.py      frozen teacher features (Qwen2.5-VL, SigLIP, Shapes)
  sources.py       source lists of config.data (prepared datasets, the Shapes world), DATA_DEFAULTS
  decode.py        record -> example (images decoded and resized, texts tokenised)
  batching.py      Grain datasets -> host batches, checkpointable (HostBatchIterator)
  pipeline.py      a config's train / eval iterators, check_data_config, the batch on the mesh
  shapes.py        the Shapes world (scenes, captions, rendering, exact parsing, teacher features)
  shapes_tasks.py  its tasks (t2i, edit, maps, compose, caption, VQA examples), Grain source, official files
  tokenizers.py    T5-layout tokenizers (SentencePiece, byte)

Submodules are imported on use (this package imports nothing heavy).
"""
