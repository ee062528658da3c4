"""The paper's analyses of a trained SIMoE model: the numbers (compute), their figures (plots), and
all of them written for one checkpoint (report, behind ``simoe analyze``)."""
