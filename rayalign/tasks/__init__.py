"""Embedded tasks with programmatic gold rewards (no downloads): text in, scores out; and a tiny reward model
fitted on the sentiment task's gold pairs (`rayalign.tasks.reward_model`, `rayalign fit-reward-model`)."""
