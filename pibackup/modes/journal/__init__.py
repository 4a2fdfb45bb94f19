"""Journal mode: snapshot plus journal segments per generation."""
