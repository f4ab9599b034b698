"""The study: a grid of transfer-learning strategies x seeds x data sizes x pretraining,
trained, evaluated, compared and reported in one command."""
