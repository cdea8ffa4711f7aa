"""Training on a user's own images: datasets (sources, splits, crops, augmentation) and the loop."""
