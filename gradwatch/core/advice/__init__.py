"""The recommender's rules (one class per fix), their priorities, and the framework snippet writers."""
