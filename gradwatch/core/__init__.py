"""Framework-free core: records (stats, structure, report) and their views (text, plots) at the bottom, the
detector's checks above them, the recommender's rules above those, then report building and the run-log format.
Nothing here imports a framework, an adapter, a reporter or the watcher."""
