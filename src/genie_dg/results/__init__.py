"""Results of runs and sweeps: per-validation records, DomainBed's model selection, result tables."""
