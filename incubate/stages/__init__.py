"""One module a stage, each with `main(recipe, out, ...)`; they hand off through the run directory."""
