"""The training machinery shared by unlearning and fine-tuning: setup, step, loop, log, checkpoints, save."""
