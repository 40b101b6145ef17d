"""Low-rank approximation: choosing a rank from a spectrum, and truncated SVD into balanced factors."""
