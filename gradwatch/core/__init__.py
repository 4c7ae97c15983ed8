"""Framework-neutral core: statistics, structure, detector, recommender, report. Numpy only."""
