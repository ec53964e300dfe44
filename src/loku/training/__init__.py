"""The training machinery shared by unlearning and fine-tuning: setup, step, loop, checkpoints."""
