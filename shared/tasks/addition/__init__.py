"""The seed's task: sums of small numbers, answered with a numbered <think> trace."""
