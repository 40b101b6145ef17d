"""What loratool gives CI pipelines: GitHub Actions annotations and job summary, JUnit XML, and the run they describe."""
