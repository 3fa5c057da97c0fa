"""A run's settings and loops: config, the Backend interface, problem sets, SFT and GRPO, evaluation, resume, records, report."""
