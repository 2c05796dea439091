"""A contributor's own machine: its data, model, local training, head re-fit and checkpoints. No networking."""
