"""End-to-end training: `losses` (triplet loss), `train` (TrainOptions, the loop, frozen-trunk
cache, initialisation, resumable checkpoints), `run` (one `remap train` run: TrainRun,
run_training, load_training_set, make_validator)."""
