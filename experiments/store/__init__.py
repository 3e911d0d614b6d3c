"""What a run keeps on disk: the run folder's files (``files``), the edited weights and editor state
(``checkpoints``), and the shapes the summaries read them into (``run_types``)."""
