class WeightError(ValueError):
    """The checkpoint's tensors do not fit the model its config.json describes."""
