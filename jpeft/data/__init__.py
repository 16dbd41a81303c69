"""Data bundled with installed packages: the embedded MiniLM checkpoint and the movie-review set."""

from jpeft.data.embedded import minilm_dir, package_dir
from jpeft.data.movies import (load_movie_reviews, movie_reviews_path, parse_movie_reviews,
                               train_dev_split)

__all__ = ["load_movie_reviews", "minilm_dir", "movie_reviews_path", "package_dir",
           "parse_movie_reviews", "train_dev_split"]
