"""Analysis of what trained policies learned: representation similarity and projections."""
