"""recstream's benchmark suite: ``python -m bench SUBCOMMAND``; results go to bench/results/."""
