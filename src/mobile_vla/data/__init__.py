"""The data layer: HDF5 episodes, validation, splits, windows + chunks, normalization,
augmentation and the frame cache."""
