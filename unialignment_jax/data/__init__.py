"""Data: records schema, manifest -> ArrayRecord preparation, Grain pipelines, teachers, tokenizers,
and the synthetic Shapes world.

  records.py       the record schema (RecordSpec, SCHEMA_VERSION, open_prepared)
  prepare_args.py  `unialignment prepare` arguments (no jax import)
  prepare.py       `unialignment prepare`: JSONL manifests -> TFDS ArrayRecord dataset (run(args, config))
  tfds_builder.py  the TFDS GeneratorBasedBuilder (array_record, no TensorFlow)
  images.py        decode / official resize + centre crop / encode / normalize
  teachers.py      frozen teacher features (Qwen2.5-VL, SigLIP, Shapes)
  pipeline.py      Grain pipelines -> host batches (tasks.py format), checkpointable; global arrays
  shapes.py        the Shapes world (scenes, captions, edits, maps, compose, VQA, exact parsing)
  tokenizers.py    T5-layout tokenizers (SentencePiece, byte)

Submodules are imported on use (this package imports nothing heavy).
"""
