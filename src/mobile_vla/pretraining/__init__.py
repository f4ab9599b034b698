"""Vision-language pretraining of the built-in backbone: the caption corpus, the contrastive +
matching training, its held-out evaluation, and the shipped weights."""
