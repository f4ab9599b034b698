"""Vision-language pretraining of the built-in backbone: the caption corpus (and, next, the
contrastive training and its evaluation)."""
