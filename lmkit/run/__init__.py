"""The composition root: the only code that reads the Hydra config and turns it into objects."""
