"""Applications built on the library (the library never imports them): ``demo`` (the
``regionmed-fast demo`` command)."""
