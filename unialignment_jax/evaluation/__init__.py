"""Evaluation suites of `unialignment evaluate`: fixed-level validation loss (val_loss.py), the Shapes
benchmark with exact scorers (shapes_bench.py, shapes_scores.py) and the SemGen-Bench generator
(semgen.py); the command is command.py."""
